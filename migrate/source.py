"""migrate-src: owns the running guest, hands it over at switchover, then serves its pages.

Tasks after switchover, in one nursery:
- the *streamer* sends every page not yet sent over the bulk channel, in runs,
  zero runs as ZeroRun, jumping to just after the last requested run
  (a vCPU that faulted there is likely to touch the next pages soon);
- the *request server* answers PageRequests on the urgent channel at once,
  from its own worker thread;
- the main task waits for the destination's DestDone.

A lost link is not the end: the session (an id both channels present) waits
for the destination to reconnect, and the stream becomes exactly the page
runs the destination's kernel still lacks.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import resource
import secrets
import time
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import trio

from . import protocol as p
from .errors import LINK_ERRORS, MigrateError, PeerError, RemoteProtocolError, UsageError, find
from .guest import Guest, GuestSpec
from .metrics import rss_mib
from .progress import Progress
from .ranges import Remaining
from .uffd import PAGE_SIZE
from .wire import BlockingFrames, FrameSocket, family_of, format_address, run_blocking, tune

log = logging.getLogger(__name__)

CHUNK_PAGES = p.DEFAULT_MAX_PAYLOAD // PAGE_SIZE
# How long the urgent channel may stay silent before the destination counts as lost.
REQUEST_TIMEOUT = 3600.0
# Connections the kernel queues while the accept loop is busy or backing off
# (a flood, a shortage of descriptors), instead of refusing them.
LISTEN_BACKLOG = 128
# A failed accept (no descriptor, no memory...) leaves the connection queued:
# pause, then try again, as trio's serve_listeners does.
ACCEPT_BACKOFF = 0.1
# Descriptors kept for the migration itself when --max-pending has to fit
# RLIMIT_NOFILE: two channels and a worker's duplicate, a reconnection's pair
# while the old one closes, the metrics file, with room to spare.
RESERVED_FDS = 16
# A warning that a flood could repeat thousands of times is logged at most this often.
WARN_INTERVAL = 2.0


@dataclass
class SourceConfig:
    host: str
    port: int
    spec: GuestSpec
    run_before: float = 1.0
    key: bytes = b""
    ready_file: str | None = None
    handshake_timeout: float = 10.0  # a silent or slow-drip client is dropped after this
    reconnect_timeout: float = 60.0  # how long a lost destination may take to come back
    max_pending: int = 16  # handshakes in progress at once; newcomers beyond are closed at once


@dataclass
class _Session:
    """The one migration in progress: its id and its two channels (None while lost)."""

    id: bytes
    bulk: FrameSocket | None = None
    urgent: FrameSocket | None = None


def _page_events(start: int, count: int, buf: bytearray | memoryview, zeros: bytearray,
                 echo: int = 0) -> Iterator[p.Event]:
    """Pages [start, start+count), read into ``buf`` with their zero flags, as page runs and zero runs."""
    view, i = memoryview(buf), 0
    while i < count:
        zero = zeros[i] == 1
        j = zeros.find(b"\x00" if zero else b"\x01", i, count)
        j = count if j < 0 else j
        if zero:
            yield p.ZeroRun(start + i, j - i, echo)
        else:
            yield p.PageRun(start + i, j - i, view[i * PAGE_SIZE:j * PAGE_SIZE], echo)
        i = j


class _Throttled:
    """A warning that may recur without end (a flood), logged at most once per interval."""

    def __init__(self, interval: float = WARN_INTERVAL) -> None:
        self.interval = interval
        self._next = -math.inf
        self._skipped = 0

    def warn(self, msg: str, *args: object) -> None:
        now = trio.current_time()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            msg, args = msg + " (and %d more times since the last report)", (*args, self._skipped)
        log.warning(msg, *args)
        self._next, self._skipped = now + self.interval, 0


def _fit_to_descriptors(wanted: int) -> int:
    """``wanted`` pending handshakes, or fewer if RLIMIT_NOFILE would not leave the migration its own."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    in_use = len(os.listdir("/proc/self/fd"))
    fit = max(1, soft - in_use - RESERVED_FDS)
    if fit < wanted:
        log.warning("the descriptor limit (%d, %d in use) leaves room for %d pending handshakes, not %d",
                    soft, in_use, fit, wanted)
    return min(wanted, fit)


class Source:
    """The source side of one migration."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.spec = cfg.spec
        self.guest: Guest | None = None
        self.remaining = Remaining([(0, cfg.spec.pages)])
        self.cursor = 0
        self.session: _Session | None = None
        self._paired = trio.Event()
        self.stats = {"pages_streamed": 0, "pages_requested": 0, "requests": 0, "rejected_peers": 0,
                      "dropped_peers": 0}
        self._pending = 0  # handshakes in progress
        self._max_pending = cfg.max_pending
        self._accept_warning = _Throttled()
        self._drop_warning = _Throttled()
        self.dest_counters: dict[str, float] = {}
        self.progress = Progress()

    # -- set-up ------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> dict[str, object]:
        """Runs the guest, migrates it once, and returns the source's metrics."""
        self.guest = await trio.to_thread.run_sync(partial(Guest, self.spec, fill=True))
        self.guest.start()
        # --run-before counts guest time, not the fill before it; on trio's clock,
        # which is offset from time.monotonic() on purpose.
        t0 = trio.current_time()
        listener = await self._listen()
        self._max_pending = _fit_to_descriptors(self.cfg.max_pending)
        port = listener.getsockname()[1]
        log.info("guest of %d MiB with %d vCPUs running %s; listening on %s", self.spec.size >> 20,
                 self.spec.vcpus, self.spec.workload.name, format_address(self.cfg.host, port))
        task_status.started(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, listener, nursery)
            await self._paired.wait()
            await trio.sleep_until(t0 + self.cfg.run_before)
            result = await self._migrate()
            nursery.cancel_scope.cancel()
        listener.close()
        return result

    async def _listen(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(family_of(self.cfg.host))
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((self.cfg.host, self.cfg.port))
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {format_address(self.cfg.host, self.cfg.port)}: {exc.strerror}",
                             hint="choose another port with --listen HOST:PORT (port 0 picks a free one)") from None
        sock.listen(LISTEN_BACKLOG)
        address = format_address(*sock.getsockname()[:2])
        print(json.dumps({"listening": address}), flush=True)
        if self.cfg.ready_file:
            with open(self.cfg.ready_file, "w") as f:
                f.write(f"{address}\n")
        return sock

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Accepts connections until cancelled: no peer and no shortage of resources ends it.

        A failed accept (out of descriptors or memory) is logged and retried
        after a pause; the connection waits in the kernel's backlog meanwhile.
        At most ``max_pending`` handshakes run at once, each holding a
        descriptor and a small buffer for up to ``--handshake-timeout``; a
        connection beyond that is closed at once (``dropped_peers``), and a
        destination tries again.
        """
        while True:
            try:
                sock, addr = await listener.accept()
            except OSError as exc:
                self._accept_warning.warn("cannot accept connections (%s); retrying every %g s",
                                          exc.strerror or exc, ACCEPT_BACKOFF)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            peer = format_address(*addr[:2])
            if self._pending >= self._max_pending:
                sock.close()
                self.stats["dropped_peers"] += 1
                self._drop_warning.warn("dropped a connection from %s: %d handshakes already pending (--max-pending)",
                                        peer, self._pending)
                continue
            self._pending += 1
            nursery.start_soon(self._greet, sock, peer)

    async def _greet(self, sock: trio.socket.SocketType, peer: str) -> None:
        """Handshake of one incoming connection; a failure closes only that connection."""
        joined = False
        try:
            tune(sock)
            # The source receives control frames and page requests, never pages: a
            # buffer without room for a payload is ~128 KiB, not ~2.1 MiB.
            fs = FrameSocket(sock, p.Connection(p.Role.SOURCE, max_payload=0, guest_pages=self.spec.pages),
                             f"destination {peer}")
            try:
                with trio.fail_after(self.cfg.handshake_timeout):
                    await self._handshake(fs)
                joined = True
            except (MigrateError, trio.TooSlowError) as exc:
                self.stats["rejected_peers"] += 1
                reason = "handshake timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                log.warning("rejected %s: %s", peer, reason)
                with trio.move_on_after(1):
                    try:
                        await fs.send(p.Error(reason[:200]))
                    except MigrateError:
                        pass
        finally:
            self._pending -= 1
            if not joined:  # a channel of the session is closed by the migration, anything else here
                sock.close()

    async def _handshake(self, fs: FrameSocket) -> None:
        nonce = p.new_nonce()
        await fs.send(p.Challenge(nonce))
        hello = await fs.expect(p.Hello)
        if not p.proof_ok(p.prove(self.cfg.key, p.Role.DESTINATION, hello.channel, nonce, hello.nonce), hello.proof):
            raise RemoteProtocolError("authentication failed: the destination does not know the key")
        s = self.session
        if hello.session == b"" and hello.channel is p.Channel.BULK:
            if s is not None:
                raise PeerError("a migration is already in progress")
            self.session = s = _Session(secrets.token_bytes(16))
        elif s is None or not hmac.compare_digest(hello.session, s.id):
            raise RemoteProtocolError(f"{hello.channel.value} channel for an unknown session")
        old = getattr(s, hello.channel.value)
        if old is not None:
            # The destination is back before this side noticed its link die (a
            # silent partition): end the old channel, which starts the recovery
            # here, and let the destination retry.
            old.abort()
            raise PeerError(f"the session's previous {hello.channel.value} channel is still closing; retry")
        await fs.send(p.Welcome(s.id, p.prove(self.cfg.key, p.Role.SOURCE, hello.channel, nonce, hello.nonce)))
        if hello.session == b"":
            sp = self.spec
            await fs.send(p.GuestInfo(sp.pages, sp.vcpus, int(sp.workload), sp.seed, sp.zero_permille, sp.rate))
        setattr(s, hello.channel.value, fs)
        log.info("%s: %s channel up", fs.peer, hello.channel.value)
        if s.bulk is not None and s.urgent is not None:
            self._paired.set()

    # -- migration ---------------------------------------------------------
    async def _migrate(self) -> dict[str, object]:
        s = self.session
        assert self.guest is not None and s is not None and s.bulk is not None and s.urgent is not None
        await trio.to_thread.run_sync(self.guest.stop)
        t_switch = time.monotonic()
        steps = self.guest.steps()
        # Downtime starts when the last vCPU stopped, as its own clock saw it.
        cpu_state = p.CpuState(tuple(self.guest.export_state()), self.guest.stopped_at_ns())
        bytes_bulk = bytes_urgent = recoveries = 0
        while True:
            bulk, urgent = s.bulk, s.urgent
            assert bulk is not None and urgent is not None
            done = False
            try:
                if recoveries == 0:
                    await bulk.send(cpu_state)
                    log.info("switchover: vCPUs stopped after %s steps; streaming %d pages", steps, self.spec.pages)
                else:
                    await self._receive_resume(bulk)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stream, bulk)
                    nursery.start_soon(self._serve_requests, urgent)
                    self.dest_counters = (await bulk.expect(p.DestDone)).counters
                    done = True
                    nursery.cancel_scope.cancel()
                failure = None
            except BaseException as exc:
                failure = find(exc, LINK_ERRORS)
                if failure is None:
                    raise
                if done:  # the destination hung up once finished: not a lost link
                    failure = None
            bytes_bulk += bulk.bytes_out
            bytes_urgent += urgent.bytes_out
            bulk.close()
            urgent.close()
            if failure is None:
                break
            self.progress.finish()
            recoveries += 1
            s.bulk = s.urgent = None
            self._paired = trio.Event()
            log.warning("lost the destination (%s); waiting up to %g s for it to reconnect", failure,
                        self.cfg.reconnect_timeout)
            with trio.move_on_after(self.cfg.reconnect_timeout):
                await self._paired.wait()
            if not self._paired.is_set():
                raise PeerError(f"the destination did not come back within {self.cfg.reconnect_timeout:g} s; "
                                "its guest is incomplete and this one is stopped",
                                hint="restart the migration from scratch")
        self.progress.finish()
        total_s = time.monotonic() - t_switch
        metrics: dict[str, object] = {
            **self.stats, "pages_total": self.spec.pages, "total_s": round(total_s, 3),
            "bytes_bulk": bytes_bulk, "bytes_urgent": bytes_urgent, "recoveries": recoveries,
            "rss_mib": rss_mib(), "guest_mib": self.spec.size / 2**20, "vcpu_steps": steps,
        }
        log.info("done in %.2f s: %d pages streamed, %d sent on request (%d requests); destination placed %s",
                 total_s, self.stats["pages_streamed"], self.stats["pages_requested"], self.stats["requests"],
                 self.dest_counters.get("pages_placed", "?"))
        return metrics

    async def _receive_resume(self, bulk: FrameSocket) -> None:
        """After a reconnection: the stream becomes exactly what the destination's kernel still lacks."""
        runs: list[tuple[int, int]] = []
        pages = 0
        while True:
            resume = await bulk.expect(p.Resume)
            runs += resume.runs
            pages += sum(count for _, count in resume.runs)
            # The destination cannot lack more than the guest; as a run holds a page at
            # least, this bounds the run list too, however many frames say "more".
            if pages > self.spec.pages:
                raise RemoteProtocolError(f"the destination's Resume names {pages} pages in {len(runs)} runs, "
                                          f"more than the guest's {self.spec.pages}")
            if not resume.more:
                break
        self.remaining = Remaining(runs)
        self.cursor = 0
        log.info("destination back: it lacks %d pages in %d runs", self.remaining.pages, len(runs))

    async def _stream(self, bulk: FrameSocket) -> None:
        assert self.guest is not None
        buf, zeros = bytearray(CHUNK_PAGES * PAGE_SIZE), bytearray(CHUNK_PAGES)
        t0 = time.monotonic()
        while runs := self.remaining.take(self.cursor, CHUNK_PAGES):
            first = runs[0][0]
            span = runs[-1][0] + runs[-1][1] - first
            self.cursor = first + span
            # Guest memory is read in a worker thread, never by the trio thread.
            await trio.to_thread.run_sync(self.guest.read_pages, first, span, buf, zeros)
            for start, count in runs:
                o = start - first
                for event in _page_events(start, count, memoryview(buf)[o * PAGE_SIZE:], zeros[o:o + count]):
                    await bulk.send(event)
                self.stats["pages_streamed"] += count
            done = self.stats["pages_streamed"] + self.stats["pages_requested"]
            mbps = bulk.bytes_out / max(time.monotonic() - t0, 1e-9) / 1e6
            self.progress.update(f"sent {done}/{self.spec.pages} pages ({100 * done / self.spec.pages:.0f}%), "
                                 f"{mbps:.0f} MB/s, {self.stats['requests']} requests")
        await bulk.send(p.SourceDone(self.stats["pages_streamed"]))
        log.info("stream complete: %d pages in %.2f s", self.stats["pages_streamed"], time.monotonic() - t0)

    async def _serve_requests(self, urgent: FrameSocket) -> None:
        """Serves page requests from a worker thread: it wakes straight from the socket and reads
        guest memory itself, so a request costs no hop between threads."""
        token = trio.lowlevel.current_trio_token()
        await run_blocking(self._serve_requests_blocking, urgent.blocking(REQUEST_TIMEOUT), token)

    def _serve_requests_blocking(self, frames: BlockingFrames, token: trio.lowlevel.TrioToken) -> None:
        assert self.guest is not None
        buf, zeros = bytearray(CHUNK_PAGES * PAGE_SIZE), bytearray(CHUNK_PAGES)
        while True:
            req = frames.receive()
            if not isinstance(req, p.PageRequest):
                raise RemoteProtocolError(f"expected PageRequest, got {type(req).__name__}")
            self.stats["requests"] += 1
            for start, count in req.runs:
                for first in range(start, start + count, CHUNK_PAGES):
                    n = min(CHUNK_PAGES, start + count - first)
                    self.guest.read_pages(first, n, buf, zeros)
                    for event in _page_events(first, n, buf, zeros, req.stamp):
                        frames.send(event)
                    self.stats["pages_requested"] += n
                # The streamer's ranges belong to the trio thread: hand the news over, don't wait.
                token.run_sync_soon(self._requested, start, count)

    def _requested(self, start: int, count: int) -> None:
        """Trio thread: pages sent on request leave the stream, which jumps to just after them."""
        self.remaining.discard(start, count)
        self.cursor = start + count


async def serve(cfg: SourceConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> dict[str, object]:
    """Runs one source until its guest has been migrated; returns its metrics."""
    return await Source(cfg).run(task_status=task_status)
