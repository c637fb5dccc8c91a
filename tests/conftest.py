"""Shared fixtures.  No userfaultfd means failure, never a skip: a skipped core
test would hide a broken machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from migrate._native import ffi
from migrate.errors import MigrateError
from migrate.guest import Guest, GuestSpec
from migrate.protocol import Connection, Role
from migrate.stats import DestinationStats, SourceStats
from migrate.uffd import Userfaultfd

BIN = Path(sys.executable).parent
HELPERS = Path(__file__).parent / "helpers"
# Lines tests want shown at the end of the run (e.g. how many races the kernel absorbed).
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    if REPORT:
        terminalreporter.section("uffd-migrate figures")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def userfaultfd_available() -> None:
    try:
        Userfaultfd().close()
    except MigrateError as exc:
        pytest.fail(f"userfaultfd is unavailable on this machine: {exc}; hint: {exc.hint}", pytrace=False)


@pytest.fixture(scope="session")
def no_uffd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wrapper that runs a command with userfaultfd forbidden by seccomp, as in a container."""
    out = tmp_path_factory.mktemp("helpers") / "no_uffd"
    subprocess.run(["cc", "-O2", "-o", str(out), str(HELPERS / "no_uffd.c")], check=True)
    return out


@dataclass
class Run:
    """What one migration left behind."""

    src_rc: int
    dst_rc: int
    src_metrics: SourceStats | None  # None: no metrics file
    dst_metrics: DestinationStats | None
    src_err: str
    dst_err: str


# Sources started by the test running now: a test that fails half-way must not leave one
# burning CPU under the tests after it.
_STARTED: list[trio.Process] = []


@pytest.fixture(autouse=True)
def no_source_left_behind():
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()


def past_handshake(conn):  # noqa: ANN001, ANN201 - a protocol Connection, returned
    """Feeds ``conn`` the handshake its role receives, preamble included, as a real peer sends it:
    the protocol accepts other control frames only after that."""
    from migrate import protocol as p

    dest = conn.role is p.Role.DESTINATION
    peer = p.Connection(p.Role.SOURCE if dest else p.Role.DESTINATION)
    for event in ([p.Challenge(b"n" * 32), p.Welcome(b"s" * 16, b"p" * 32)] if dest else
                  [p.Hello(p.Channel.BULK, b"", b"n" * 32, b"p" * 32)]):
        conn.receive_data(b"".join(bytes(c) for c in peer.send(event)))
        assert conn.next_event() == event
    return conn


class Side:
    """A destination's plane over a registered, empty guest region, with a done eventfd."""

    def __init__(self, pages: int) -> None:
        self.uffd = Userfaultfd()
        self.guest = Guest(GuestSpec(pages=pages, vcpus=1), fill=False)
        self.uffd.register(self.guest.base, self.guest.spec.size)
        self.plane = ffi.new("dst_plane_t *", {"uffd": self.uffd.fd, "base": self.guest.base, "pages": pages})
        self.done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.plane.done_fd = self.done
        self.conn = past_handshake(Connection(Role.DESTINATION, guest_pages=pages))

    def close(self) -> None:
        os.close(self.done)
        self.uffd.close()
        self.guest.close()


async def destination_against(fake_source) -> tuple[int, str]:  # noqa: ANN001 - async (listener) -> None
    """Runs migrate-dst against ``fake_source(listener)``, a hand-made source on 127.0.0.1 that a test
    writes to break one rule; returns the destination's exit code and stderr."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fake_source, listener)
                proc = await trio.run_process(
                    [str(BIN / "migrate-dst"), "--connect", f"127.0.0.1:{listener.getsockname()[1]}"],
                    capture_stderr=True, check=False)
                nursery.cancel_scope.cancel()
    finally:
        listener.close()
    return proc.returncode, proc.stderr.decode()


async def start_source(tmp: Path, args: list[str], wrapper: list[str] | None = None,
                       listen: str = "127.0.0.1:0") -> tuple[trio.Process, int]:
    """Starts migrate-src on 127.0.0.1 (stderr to tmp/src.err, metrics to tmp/src.json); returns it and its port.

    ``wrapper`` goes before the command, e.g. ``["prlimit", "--nofile=64:64"]``.
    """
    ready = tmp / "ready"
    for f in (ready, tmp / "src.json"):
        f.unlink(missing_ok=True)
    with open(tmp / "src.err", "w") as err:  # the child keeps its own copy
        proc = await trio.lowlevel.open_process(
            [*(wrapper or []), str(BIN / "migrate-src"), "--listen", listen, "--ready-file", str(ready),
             "--metrics", str(tmp / "src.json"), *args],
            stdout=subprocess.DEVNULL, stderr=err)
    _STARTED.append(proc)
    while not (ready.exists() and ready.read_text().strip()):
        assert proc.poll() is None, (tmp / "src.err").read_text()
        await trio.sleep(0.05)
    return proc, int(ready.read_text().split(":")[1])


async def run_destination(tmp: Path, port: int, args: list[str]) -> tuple[int, str, dict]:
    """Runs migrate-dst against 127.0.0.1:port to its end: (exit code, stderr, metrics)."""
    metrics = tmp / "dst.json"
    metrics.unlink(missing_ok=True)
    proc = await trio.run_process([str(BIN / "migrate-dst"), "--connect", f"127.0.0.1:{port}",
                                   "--metrics", str(metrics), *args], check=False, capture_stderr=True)
    return proc.returncode, proc.stderr.decode(), json.loads(metrics.read_text()) if metrics.exists() else {}


async def migrate(tmp: Path, src_args: list[str], dst_args: tuple[str, ...] | list[str] = (),
                  timeout: float = 180) -> Run:
    """Runs migrate-src and migrate-dst as real processes on 127.0.0.1 and collects what they report."""
    with trio.fail_after(timeout):
        src, port = await start_source(tmp, src_args)
        try:
            dst_rc, dst_err, dst_metrics = await run_destination(tmp, port, list(dst_args))
            src_rc = await src.wait()
        finally:
            if src.returncode is None:
                src.kill()
                with trio.CancelScope(shield=True):
                    await src.wait()
    src_json = tmp / "src.json"
    src_metrics = SourceStats.from_json(json.loads(src_json.read_text())) if src_json.exists() else None
    return Run(src_rc, dst_rc, src_metrics, DestinationStats.from_json(dst_metrics) if dst_metrics else None,
               (tmp / "src.err").read_text(), dst_err)
