"""Which failures count as a lost link: only link errors, never a bug beside them."""

import os
from types import SimpleNamespace

import pytest
import trio

from migrate import cli
from migrate import protocol as p
from migrate.destination import Destination, DestinationConfig
from migrate.errors import PeerError, RemoteProtocolError, UffdError, lost_link


def test_only_link_errors_make_a_lost_link() -> None:
    """A bug next to a lost link in one exception group is raised, never taken for a reconnect."""
    gone, bad = PeerError("gone"), RemoteProtocolError("bad frame")
    assert lost_link(ExceptionGroup("", [gone, ExceptionGroup("", [bad])])) is gone
    assert lost_link(gone) is gone
    assert lost_link(ExceptionGroup("", [gone, UffdError("UFFDIO_COPY", 22)])) is None
    assert lost_link(ExceptionGroup("", [gone, KeyError("bug")])) is None
    assert lost_link(ValueError("bug")) is None


async def _raise_all(*errors: BaseException) -> None:
    """Raises each of ``errors`` from a task of one nursery, as a migration's tasks would."""
    async def fail(exc: BaseException) -> None:
        raise exc

    async with trio.open_nursery() as nursery:
        for exc in errors:
            nursery.start_soon(fail, exc)


def test_every_failure_of_a_group_is_named_in_the_one_line() -> None:
    """Two loops failing at once: the user reads both, not the first alone."""
    with pytest.raises(PeerError) as caught:
        cli._run_trio(_raise_all, PeerError("gone", hint="retry"), PeerError("bad frame", hint="retry"))
    assert str(caught.value) in ("gone (also: bad frame)", "bad frame (also: gone)")
    assert caught.value.hint == "retry"


def test_a_bug_beside_our_errors_is_raised_whole_and_an_interrupt_wins() -> None:
    with pytest.raises(BaseExceptionGroup) as caught:
        cli._run_trio(_raise_all, PeerError("gone"), ValueError("bug"))
    assert caught.group_contains(ValueError)
    with pytest.raises(KeyboardInterrupt):
        cli._run_trio(_raise_all, PeerError("gone"), KeyboardInterrupt())


class _Plane:
    """A destination whose loops are stand-ins: each places every page, then fails with ``exc``."""

    def __init__(self, exc: Exception, done: int) -> None:
        self.dst = Destination(DestinationConfig("127.0.0.1", 1))
        plane = self.dst.plane
        plane.c.pages, plane.c.done_fd = 8, done
        self.exc = exc

        async def place_all_then_fail(*_: object) -> None:
            plane.c.bulk.pages = 8
            raise self.exc

        async def idle(*_: object) -> None:
            await trio.sleep_forever()

        plane.placer = place_all_then_fail  # type: ignore[method-assign]
        plane.fault_reader = plane.reply_placer = self.dst._watch_progress = self.dst._watchdog = idle  # type: ignore


async def test_once_every_page_is_here_only_a_lost_link_is_forgiven() -> None:
    """A link breaking as the last page arrives does not matter; a bug at that moment is never swallowed."""
    done = os.eventfd(0, os.EFD_NONBLOCK)
    # The bulk connection's state: the source's Downtime was read (else the postcopy would read it).
    links = SimpleNamespace(bulk=SimpleNamespace(conn=SimpleNamespace(state=p.State.STREAMING)), requests=None,
                            replies=None)
    try:
        side = _Plane(PeerError("gone"), done)
        assert await side.dst._postcopy(None, None, links, 0.0) is links  # type: ignore[arg-type]
        side = _Plane(ValueError("bug"), done)
        with pytest.raises(ExceptionGroup) as caught:
            await side.dst._postcopy(None, None, links, 0.0)  # type: ignore[arg-type]
        assert caught.group_contains(ValueError, match="bug")
    finally:
        os.close(done)
