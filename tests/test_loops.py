"""The native loops under their trio owners: stops, peer closes, silence, bad frames, and a real transfer.

Real sockets (socketpairs) and a real userfaultfd; no processes.
"""

from __future__ import annotations

import socket
import struct
import time
from functools import partial

import pytest
import trio

from helpers import Side
from migrate import protocol as p
from migrate._native import ffi, lib
from migrate.errors import PeerError, ProtocolViolation, RemoteProtocolError, lost_link
from migrate.guest import Guest, GuestSpec, Workload
from migrate.loops import run_native

PAGES = 4096


@pytest.fixture
def side():
    s = Side(PAGES)
    yield s
    s.close()


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def link(sock: socket.socket) -> object:
    """A plaintext link_t on sock, as the loops take it."""
    return ffi.new("link_t *", {"fd": sock.fileno()})


async def test_a_cancelled_loop_stops_promptly_and_is_not_a_peer_error(side: Side) -> None:
    ours, theirs = pair()
    with ours, theirs:
        t0 = time.monotonic()
        with trio.move_on_after(0.3):
            await run_native(lib.dst_place_loop, side.plane, 0, side.conn.accepts, link(ours), side.conn.rx, 60_000, peer="peer")
        assert time.monotonic() - t0 < 2  # the eventfd woke the thread; no exception escaped


async def test_a_peer_closing_is_a_peer_error(side: Side) -> None:
    ours, theirs = pair()
    with ours:
        theirs.close()
        with trio.fail_after(5), pytest.raises(PeerError, match="closed the connection"):
            await run_native(lib.dst_place_loop, side.plane, 0, side.conn.accepts, link(ours), side.conn.rx, 60_000, peer="peer")


async def test_silence_while_the_stream_owes_pages_is_a_lost_link(side: Side) -> None:
    ours, theirs = pair()
    with ours, theirs:
        t0 = time.monotonic()
        with trio.fail_after(5), pytest.raises(PeerError, match="went silent"):
            await run_native(lib.dst_place_loop, side.plane, 0, side.conn.accepts, link(ours), side.conn.rx, 200, peer="peer")
        assert time.monotonic() - t0 >= 0.2


async def test_silence_with_no_request_outstanding_is_normal(side: Side) -> None:
    ours, theirs = pair()
    with ours, theirs:
        with trio.move_on_after(1.0) as scope:  # five idle periods
            await run_native(lib.dst_place_loop, side.plane, 1, side.conn.accepts, link(ours), side.conn.rx, 200, peer="peer")
        assert scope.cancelled_caught
        side.plane.faults.pages_requested = 1  # now one page is owed and nothing comes
        with trio.fail_after(5), pytest.raises(PeerError, match="went silent"):
            await run_native(lib.dst_place_loop, side.plane, 1, side.conn.accepts, link(ours), side.conn.rx, 200, peer="peer")


async def test_a_bad_frame_is_a_protocol_error_and_places_nothing(side: Side) -> None:
    ours, theirs = pair()
    with ours, theirs:
        theirs.sendall(struct.pack("<IIQQII", lib.WIRE_PAGES, 1, PAGES, 0, 0, 0) + b"x" * 4096)
        with trio.fail_after(5), pytest.raises(RemoteProtocolError, match="outside the guest"):
            await run_native(lib.dst_place_loop, side.plane, 0, side.conn.accepts, link(ours), side.conn.rx, 60_000, peer="peer")
    assert side.plane.bulk.pages == 0


@pytest.mark.parametrize("kind,flags", [(lib.WIRE_DISCARD, 0), (lib.WIRE_PAGES, lib.WIRE_REPLACE),
                                        (lib.WIRE_REQUEST, 0)])
async def test_a_frame_out_of_order_is_a_protocol_violation_never_a_lost_link(side: Side, kind: int,
                                                                              flags: int) -> None:
    """A discard or a replacement after switchover, or a request on the stream, is well formed but out of
    order: reconnecting would meet it again, so it ends the migration (docs/security.md) and places nothing."""
    ours, theirs = pair()
    with ours, theirs:
        payload = b"x" * 4096 if kind == lib.WIRE_PAGES else struct.pack("<QQ", 0, 1) if kind == lib.WIRE_REQUEST \
            else b""
        theirs.sendall(struct.pack("<IIQQII", kind, 1, 0, 0, 0, flags) + payload)
        with trio.fail_after(5), pytest.raises(ProtocolViolation, match="out of order") as caught:
            await run_native(lib.dst_place_loop, side.plane, 0, side.conn.accepts, link(ours), side.conn.rx, 60_000,
                             peer="peer")
        assert lost_link(caught.value) is None
    assert side.plane.bulk.pages == side.plane.bulk.discarded == 0


async def test_a_control_frame_hands_the_connection_back_to_python(side: Side) -> None:
    ours, theirs = pair()
    src = side.peer  # the source's end of the conversation, in the postcopy stream
    with ours, theirs:
        theirs.sendall(b"".join(bytes(c) for c in src.send(p.ZeroRun(0, 2)) + src.send(p.SourceDone(2))))
        with trio.fail_after(5):
            end = await run_native(lib.dst_place_loop, side.plane, 0, side.conn.accepts, link(ours), side.conn.rx, 60_000,
                                   peer="peer")
        assert end == lib.LOOP_CONTROL
        assert side.conn.next_event() == p.SourceDone(2)  # read on from where the loop stopped
    assert side.plane.bulk.pages == side.plane.bulk.zero_pages == 2


async def test_stream_from_guest_memory_arrives_whole(side: Side) -> None:
    """The source's sender and the destination's placer, back to back: every page placed once, same digest."""
    spec = GuestSpec(pages=PAGES, vcpus=1, workload=Workload.uniform, zero_permille=300)
    src_guest = Guest(spec, fill=True)
    stats = ffi.new("send_stats_t *")
    runs = ffi.new("struct wire_run[]", [{"start": 0, "count": 1000}, {"start": 1000, "count": PAGES - 1000}])
    ours, theirs = pair()
    theirs.setblocking(False)
    try:
        with ours, theirs, trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(run_native, lib.dst_place_loop, side.plane, 0, side.conn.accepts, link(ours),
                                           side.conn.rx, 60_000, peer="source"))
                await run_native(lib.src_send_runs, src_guest.base, PAGES, link(theirs), runs, 2, 0, ffi.NULL,
                                 60_000,
                                 stats, peer="destination")
                await trio.lowlevel.wait_readable(side.done)
                nursery.cancel_scope.cancel()
        assert side.plane.bulk.pages == PAGES and stats.pages == PAGES
        assert 0 < side.plane.bulk.zero_pages == stats.zero_pages < PAGES
        assert await trio.to_thread.run_sync(side.guest.digest) == await trio.to_thread.run_sync(src_guest.digest)
    finally:
        src_guest.close()
