"""What the tests share: real migrate-src and migrate-dst processes on 127.0.0.1 (start_source,
run_destination, migrate, destination_against), a destination plane over an empty guest (Side),
a TLS link whose peer a test drives by hand (TlsPair), protocol Connections that really talked
(conversation, deliver), a hostile peer's bytes (hostile, send_raw), and the figures printed at the
end of the run (REPORT).

A plain module, imported by the test files and by tests/soak.py; conftest.py holds only pytest's
fixtures and hooks.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable
from pathlib import Path

import trio
import trustme

from migrate._native import ffi, lib
from migrate.guest import Guest, GuestSpec
from migrate.loops import run_native
from migrate import protocol as p
from migrate.protocol import codec
from migrate.stats import DestinationStats, SourceStats
from migrate.uffd import Userfaultfd
from migrate.wire import TlsConfig, format_address

BIN = Path(sys.executable).parent
# A source that has not said where it listens after this long has hung (it takes well under 1 s).
READY_S = 30
# Lines tests want shown at the end of the run (e.g. how many races the kernel absorbed).
REPORT: list[str] = []
# What a verifying destination runs with in the end-to-end tests.
DST = ["--verify", "--run-after", "0.2"]


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



def assert_migrated(run: Run) -> DestinationStats:
    assert run.dst_rc == 0, run.dst_err
    assert run.src_rc == 0, run.src_err
    m = run.dst_metrics
    assert m.verified is True
    assert m.pages_placed == m.pages_total
    assert "verified: yes" in run.dst_err
    assert "Traceback" not in run.dst_err + run.src_err
    REPORT.append(f"migration {m.guest_mib:7.2f} MiB {m.workload:10} {m.vcpus} vCPUs: downtime "
                  f"{m.downtime_ms:.1f} ms, {m.total_s:.2f} s, {m.faults} faults, {m.eexist} -EEXIST, "
                  f"stalls p50 {m.vcpu_stall_us.p50:.0f} µs, verified")
    return m



def deliver(sender: p.Connection, receiver: p.Connection, event: p.Event) -> p.Event:
    """``event`` through both ends: sent by ``sender``, received by ``receiver``; what arrived."""
    receiver.receive_data(b"".join(bytes(c) for c in sender.send(event)))
    return receiver.next_event()


def hostile(event: p.Event, preamble: bool = False) -> bytes:
    """``event``'s bytes as a peer that ignores the protocol's order sends them (our Connection would refuse)."""
    return (codec.preamble() if preamble else b"") + b"".join(bytes(c) for c in codec.encode(event))


def run_a_while(guest: Guest, steps_each: int = 20_000, within: float = 30) -> None:
    """Starts ``guest`` and stops it once every vCPU has made ``steps_each`` steps: a stop that lands
    mid-run, whatever the machine's speed (a fixed sleep may end before a vCPU on a loaded machine ran)."""
    guest.start()
    deadline = time.monotonic() + within
    while min(guest.live_steps_each()) < steps_each:
        assert time.monotonic() < deadline, f"vCPUs made {guest.live_steps_each()} steps in {within} s"
        time.sleep(0.001)
    guest.stop()


async def drip(sock: socket.socket, data: bytes, every: float) -> None:
    """Sends ``data`` a byte at a time, one every ``every`` seconds: a peer that is never silent."""
    for byte in data:
        sock.send(bytes([byte]))
        await trio.sleep(every)


async def send_raw(sock: trio.socket.SocketType, data: bytes) -> None:
    """Writes ``data`` whole on a plaintext socket, bypassing its FrameSocket: a hostile peer's bytes."""
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


def conversation(to: p.State, pages: int = 100) -> tuple[p.Connection, p.Connection]:
    """A source and a destination Connection that really said what leads to ``to``, for a guest of ``pages``.

    Bulk states start a new session (the destination learns the guest; in hybrid mode for the round
    states, postcopy otherwise); ``RESUMING``, ``REQUESTING`` and ``REPLYING`` join one (both know it).
    """
    S, D = p.Role.SOURCE, p.Role.DESTINATION
    rounds = to in (p.State.BETWEEN_ROUNDS, p.State.ROUND, p.State.FINAL_ROUND)
    info = p.GuestInfo(pages, 1, 0, 1, 0, 0, p.Mode.hybrid if rounds else p.Mode.postcopy)

    def handshake(channel: p.Channel, session: bytes) -> list[tuple[p.Role, p.Event]]:
        return [(S, p.Challenge(b"n" * 32)), (D, p.Hello(channel, session, b"n" * 32, b"p" * 32)),
                (S, p.Welcome(b"s" * 16, b"p" * 32))]

    joined = {p.State.RESUMING: p.Channel.BULK, p.State.REQUESTING: p.Channel.REQUESTS,
              p.State.REPLYING: p.Channel.REPLIES}
    if to in joined:
        steps = handshake(joined[to], b"s" * 16)
    else:
        steps = handshake(p.Channel.BULK, b"") + [(S, info)] * (to is not p.State.DESCRIBING)
        steps += {p.State.ROUND: [(S, p.Round(1, pages))], p.State.FINAL_ROUND: [(S, p.Round(1, pages, final=True))],
                  p.State.STARTING: [(S, p.CpuState(((1, 2, 3),)))],
                  p.State.REPORTED: [(S, p.CpuState(((1, 2, 3),))), (D, p.Running())],
                  p.State.STREAMING: [(S, p.CpuState(((1, 2, 3),))), (D, p.Running()), (S, p.Downtime(1))]}.get(to, [])
    src, dst = p.Connection(S, info), p.Connection(D, info if to in joined else None)
    for who, event in steps:
        sender, receiver = (src, dst) if who is S else (dst, src)
        assert deliver(sender, receiver, event) == event
    assert src.state is dst.state is to
    return src, dst


@dataclass
class Loop:
    """A native loop and its context struct, filled as its trio task fills it.  The struct holds pointers
    only: what they point to (links, statistics) is kept in ``keep`` for as long as the loop may run."""

    fn: Callable[..., int]
    ctx: Any
    keep: tuple[Any, ...] = ()

    async def run(self, *args: object, peer: str) -> int:
        """Runs the loop with its context, then ``args`` (a streamer's runs), under ``run_native``."""
        return await run_native(self.fn, self.ctx, *args, peer=peer)


def sender(base: int, pages: int, link: Any, stats: Any, idle_ms: int = 60_000) -> Loop:
    """The source's streamer (``src_stream_runs``), unpaced, sending from the guest at ``base`` on ``link``."""
    ctx = ffi.new("src_sender_t *", {"base": base, "pages": pages, "page_shift": 12, "link": link, "idle_ms": idle_ms,
                                     "pace": ffi.NULL, "st": stats})
    return Loop(lib.src_stream_runs, ctx, (link, stats))


def request_server(base: int, pages: int, requests: Any, rx: Any, replies: Any, stats: Any, notes: Any,
                   idle_ms: int = 60_000) -> Loop:
    """The source's request server: requests read on ``requests`` (buffer ``rx``), replies on ``replies``."""
    ctx = ffi.new("src_server_t *", {
        "replies": {"base": base, "pages": pages, "page_shift": 12, "link": replies, "idle_ms": idle_ms, "pace": ffi.NULL,
                    "st": stats},
        "requests": requests, "rx": rx, "notes": notes})
    return Loop(lib.src_request_server, ctx, (requests, rx, replies, stats, notes))


class Side:
    """A destination's plane over a registered, empty guest region, with a done eventfd, and a bulk
    connection (``conn``, its source's end ``peer``) in protocol state ``state``."""

    def __init__(self, pages: int, state: p.State = p.State.STREAMING) -> None:
        self.uffd = Userfaultfd()
        self.guest = Guest(GuestSpec(pages=pages, vcpus=1), fill=False)
        self.uffd.register(self.guest.base, self.guest.spec.size)
        self.plane = ffi.new("dst_plane_t *", {"uffd": self.uffd.fd, "pagemap_fd": -1, "nregions": 1,
                                               "region": [(self.guest.base, 0, pages)], "pages": pages,
                                               "page_shift": 12})
        self.done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.plane.done_fd = self.done
        self.peer, self.conn = conversation(state, pages)

    def placer(self, link: Any, idle_ms: int = 60_000, replies: bool = False) -> Loop:
        """The bulk placer (or the reply placer) of this plane, reading ``link`` through ``conn``'s buffer."""
        ctx = ffi.new("dst_placer_t *", {"plane": self.plane, "link": link, "rx": self.conn.rx,
                                         "accept": self.conn.accepts, "idle_ms": idle_ms})
        return Loop(lib.dst_reply_placer if replies else lib.dst_bulk_placer, ctx, (link,))

    def close(self) -> None:
        os.close(self.done)
        self.uffd.close()
        self.guest.close()


class TlsPair:
    """A TLS 1.3 connection over a socketpair: our end is a native ``link`` (a client, as a destination
    is) on ``ours``; the peer is Python's ssl module in memory on ``theirs``, so that a test can make it
    do what our own code never does (send close_notify, fall silent mid-record).  Certificates are made
    at test time (trustme) in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        pki = Pki(tmp)  # ours is the destination's certificate, the peer's the source's (127.0.0.1)
        self.config = pki.config(False, "dst")
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.link = ffi.new("link_t *", {"fd": self.ours.fileno()})
        self.want, self.why = ffi.new("int *"), ffi.new("char **")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp / "src.pem", tmp / "src.key")
        pki.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual, as ours demands
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.peer = ctx.wrap_bio(self._in, self._out, server_side=True)
        assert lib.tls_attach(self.link, self.config.ctx, b"127.0.0.1", self.why) == 0
        ours_done = theirs_done = False
        for _ in range(100):  # a handful of round trips
            if not ours_done:
                rc = lib.tls_handshake(self.link, self.want, self.why)
                assert rc in (0, -errno.EAGAIN), self.text()
                ours_done = rc == 0
            if not theirs_done:
                try:
                    self.peer.do_handshake()
                    theirs_done = True
                except ssl.SSLWantReadError:
                    pass
            self.pump()
            if ours_done and theirs_done:
                break
        assert ours_done and theirs_done

    def text(self) -> str:
        """What ``why`` says after a failed call on our link."""
        return ffi.string(self.why[0]).decode() if self.why[0] else ""

    def pump(self) -> None:
        """Moves what the peer wrote to its socket, and what arrived on its socket to the peer."""
        if data := self._out.read():
            self.theirs.sendall(data)
        try:
            while data := self.theirs.recv(1 << 16):
                self._in.write(data)
        except BlockingIOError:
            pass

    def close_notify(self) -> None:
        """The peer ends its side cleanly with a close_notify alert (it would then wait for ours)."""
        try:
            self.peer.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.pump()

    def close(self) -> None:
        if self.link.ssl != ffi.NULL:
            lib.tls_detach(self.link)
        self.ours.close()
        self.theirs.close()


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
                       listen: str = "127.0.0.1:0", env: dict[str, str] | None = None) -> tuple[trio.Process, int]:
    """Starts migrate-src on 127.0.0.1 (stderr to tmp/src.err, metrics to tmp/src.json); returns it and its port.

    ``wrapper`` goes before the command, e.g. ``["prlimit", "--nofile=64:64"]``; ``env`` is its whole
    environment (None: this process's).
    """
    ready = tmp / "ready"
    for f in (ready, tmp / "src.json"):
        f.unlink(missing_ok=True)
    with open(tmp / "src.err", "w") as err:  # the child keeps its own copy
        proc = await trio.lowlevel.open_process(
            [*(wrapper or []), str(BIN / "migrate-src"), "--listen", listen, "--ready-file", str(ready),
             "--metrics", str(tmp / "src.json"), *args],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    _STARTED.append(proc)
    with trio.fail_after(READY_S):
        while not (ready.exists() and ready.read_text().strip()):
            assert proc.poll() is None, (tmp / "src.err").read_text()
            await trio.sleep(0.05)
    return proc, int(ready.read_text().strip().rpartition(":")[2])  # HOST:PORT, [::1]:PORT too


# The source's log line for each connection a destination opens: its address (the destination's
# port) and which channel it is.
_CHANNEL_UP = re.compile(r"destination (?:\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d+): (bulk|requests|replies) channel up")


def channel_ports(src_err: str) -> dict[str, int]:
    """The destination's port of each channel, from the source's log (one session, no reconnection:
    each channel came up once)."""
    found = _CHANNEL_UP.findall(src_err)
    ports = {channel: int(port) for port, channel in found}
    assert len(found) == len(ports) == 3, src_err
    return ports


class Pki:
    """A CA, a certificate for the source (127.0.0.1, localhost and ``more`` names) and one for the
    destination, as PEM files in ``tmp``; ``args(name)`` gives a command's TLS options, ``config`` our
    own end's."""

    def __init__(self, tmp: Path, more: tuple[str, ...] = ()) -> None:
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        self.issue("src", "127.0.0.1", "localhost", *more)
        self.issue("dst", "migrate-dst")

    def issue(self, name: str, *identities: str, **kw: object) -> None:
        cert = self.ca.issue_cert(*identities, **kw)
        cert.private_key_pem.write_to_path(str(self.dir / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(self.dir / f"{name}.pem"))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.dir / f"{name}.pem"), append=True)

    def files(self, name: str, ca: Path | None = None) -> tuple[str, str, str]:
        """``name``'s certificate and key, and the CA it trusts (this one's unless ``ca``)."""
        return str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key"), str(ca or self.dir / "ca.pem")

    def args(self, name: str, ca: Path | None = None) -> list[str]:
        cert, key, ca_file = self.files(name, ca)
        return ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca_file]

    def config(self, server: bool, name: str) -> TlsConfig:
        """A TLS context of ours with ``name``'s certificate (a fake peer's end)."""
        return TlsConfig(server, *self.files(name))


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """utime + stime of thread ``tid`` of ``pid``, or of all its threads (None once it is gone): fields 14
    and 15 of /proc/PID/task/TID/stat, after the command's parentheses."""
    total = 0
    try:
        tids = [str(tid)] if tid is not None else os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for t in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{t}/stat").read_text()
        except OSError:
            if tid is not None:
                return None
            continue  # a thread that ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def thread_cpu_seconds(pid: int, tid: int, over: float) -> float:
    """The CPU time thread ``tid`` of process ``pid`` uses over the next ``over`` seconds: a waiting
    thread that spins shows up here (the trio thread is ``tid == pid``)."""
    before = cpu_seconds(pid, tid)
    await trio.sleep(over)
    after = cpu_seconds(pid, tid)
    assert before is not None and after is not None, f"process {pid} ended"
    return after - before


async def run_destination(tmp: Path, port: int, args: list[str], host: str = "127.0.0.1",
                          wrapper: list[str] | None = None, env: dict[str, str] | None = None) -> tuple[int, str, dict]:
    """Runs migrate-dst against host:port to its end: (exit code, stderr, metrics); ``wrapper`` and
    ``env`` as ``start_source`` takes them.

    Every migration the tests run is proven: ``--verify`` is added when ``args`` lack it, and a
    destination that exits 0 must have verified its guest by replay.
    """
    metrics = tmp / "dst.json"
    metrics.unlink(missing_ok=True)
    verify = [] if "--verify" in args else ["--verify"]
    proc = await trio.run_process([*(wrapper or []), str(BIN / "migrate-dst"), "--connect", format_address(host, port),
                                   "--metrics", str(metrics), *verify, *args], check=False, capture_stderr=True, env=env)
    err = proc.stderr.decode()
    raw = json.loads(metrics.read_text()) if metrics.exists() else {}
    if proc.returncode == 0:
        assert raw.get("verified") is True, f"a destination ended well but its guest was not verified:\n{err}"
    return proc.returncode, err, raw


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
