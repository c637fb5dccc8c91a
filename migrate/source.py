"""migrate-src: owns the running guest, hands it over at switchover, then serves its pages.

Three modes (``SourceConfig.mode``):

- *postcopy*: at switchover the vCPUs stop and their state goes at once;
- *hybrid*: first, while the guest keeps running here, precopy rounds: round 1
  streams every page, each later round the pages the kernel saw written
  during the previous one (``migrate.dirty``), flagged so that the
  destination replaces its older copy; the destination acknowledges each
  round.  At switchover the vCPUs stop, one last scan gives the pages written
  since the last round, and the destination is told to discard them before
  the CPU state goes; then postcopy as below, for those pages only;
- *precopy*: the same rounds, then those last pages are sent with the vCPUs
  stopped (stop-and-copy) before the CPU state: the destination starts its
  vCPUs with every page present.

After switchover the guest is stopped, and one nursery per session runs:
- the *streamer*: a trio task that asks its pre-paging policy
  (``migrate.prepage``, ``--prepage``) for the next window of pages not yet
  sent, from the runs the request server sent (by default it jumps to just
  after the last requested run: a vCPU that faulted there is likely to touch
  the next pages soon), and has the native sender stream it straight from
  guest memory, zero runs as zero frames, paced by a token bucket of its own
  when ``--max-bandwidth`` caps it;
- the *request server*: a native loop that reads page requests on the
  requests connection and answers each at once on the replies connection;
- the main task, which waits for the destination's DestDone (it follows
  the last request on the requests connection).

A lost link is not the end: the session (an id every connection presents)
waits for the destination to reconnect, and the stream becomes exactly the
page runs the destination's kernel still lacks.  During the rounds, the
round under way is sent again whole as well (a replaced page that did not
arrive is stale, not absent); a switchover the destination did not confirm
(``Resume.started``) is sent again; one it confirmed never is.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import hmac
import json
import logging
import math
import os
import resource
import secrets
import struct
import termios
import time
from dataclasses import dataclass, field
from functools import partial

import trio

from . import prepage
from . import protocol as p
from ._native import ffi, lib
from .dirty import DirtyTracker, Runs
from .errors import MigrateError, PeerError, RemoteProtocolError, UsageError, lost_link, printable
from .guest import Guest, GuestSpec
from .loops import run_native
from .metrics import Histogram, rss_mib
from .progress import Progress
from .ranges import Remaining
from .stats import FirstWindow, GuestPace, Round, SourceStats, Switchover
from .uffd import PAGE_SIZE
from .wire import FrameSocket, TlsConfig, family_of, format_address, mark_urgent, tune

log = logging.getLogger(__name__)

# Pages the streamer hands the native sender at a time: large enough that the
# hand-over costs little, small enough that the stream follows a request's
# jump within a few milliseconds.
WINDOW_PAGES = 2048
# Under --max-bandwidth a window is about this long at the cap (and at least
# MIN_WINDOW_PAGES): on a slow link a 2048-page window takes tens of
# milliseconds, too long for the stream to follow a fault.
WINDOW_S = 0.004
MIN_WINDOW_PAGES = 64
# The cap's bucket holds this much time at the cap (and at least
# MIN_BURST_BYTES): enough to make up for the pause between two windows while
# the streamer picks the next (measured: with 1 ms the stream lost 3-6% of a
# 50 MB/s cap on a busy machine).  One send takes at most QUANTUM_S at the
# cap (and at least MIN_QUANTUM_BYTES): in a steady stream no burst at a
# bottleneck is longer.  Over any second the stream sends at most the cap
# plus the bucket plus one send (pacer_t), 0.55% of the cap, so it holds the
# cap to 1% in every second; the floors keep that true down to a cap of
# 1 MB/s (0.91% there; with floors of 128 and 16 KiB a 2 MB/s stream's first
# second was 7% over: tests/test_bandwidth.py).
BURST_S = 0.005
MIN_BURST_BYTES = 4096
QUANTUM_S = 0.0005
MIN_QUANTUM_BYTES = 4096
# Samples of the stream's bytes over time, for the bench's 1 s windows: one
# per interval, bounded.
TIMELINE_INTERVAL = 0.1
MAX_TIMELINE = 10_000
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
# A destination sends its first bytes as soon as it connects: a connection
# silent for this long is closed, whatever --handshake-timeout allows.
FIRST_BYTES_S = 1.0
# How often the end of the stream checks what the destination's kernel has acknowledged.
DRAIN_POLL_S = 0.05
# A refused peer is told why (an Error frame) within this long, or not at all.
REFUSE_S = 1.0
# A warning that a flood could repeat thousands of times is logged at most this often.
WARN_INTERVAL = 2.0

# Working-set order in postcopy: the pages written in each of the last two
# stretches of this length before switchover are streamed first.  A busy
# guest also writes cold pages now and then (hotset: 10% of its accesses are
# uniform): one long stretch would catch many of them, and they would dilute
# the set; a cold page is seldom written in both of two short ones, while a
# hot page almost always is.
WORKING_SET_S = 0.01
# Precopy rounds stop converging when a round's pages are written again about
# as fast as they are sent (a busy guest rewrites its hot set faster than any
# link sends it): once the pages written during a round reach this share of
# the pages it sent, another round would not shrink them, so the guest
# switches over at once.
NOT_CONVERGING = 0.8


class StreamOrder(enum.Enum):
    """What the postcopy stream sends first."""

    address = "address"
    working_set = "working-set"


class Phase(enum.Enum):
    ROUNDS = "rounds"  # the guest runs here; precopy rounds copy its memory
    SWITCHED = "switched"  # the vCPUs are stopped: the switchover is sent, or being sent

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
    link_timeout: float = 10.0  # a send the destination does not take for this long means a lost link
    max_pending: int = 16  # handshakes in progress at once; newcomers beyond are closed at once
    tls: TlsConfig | None = None  # mutual TLS 1.3 on every connection
    mode: p.Mode = p.Mode.postcopy
    precopy_rounds: int = 10  # at most this many rounds, the full first one included
    switchover_ms: float = 5.0  # rounds end once what is written would take this long to send
    stream_order: StreamOrder = StreamOrder.address
    max_bandwidth: int = 0  # bytes per second the background stream may use; 0: no cap
    prepage: str = "jump"  # the postcopy stream's pre-paging policy (migrate.prepage)


@dataclass
class _Links:
    """One session's three connections, once all are up."""

    bulk: FrameSocket
    requests: FrameSocket
    replies: FrameSocket


@dataclass
class _Session:
    """The one migration in progress: its id and its connections (None while lost)."""

    id: bytes
    born: float = field(default_factory=trio.current_time)
    bulk: FrameSocket | None = None
    requests: FrameSocket | None = None
    replies: FrameSocket | None = None

    def complete(self) -> bool:
        return None not in (self.bulk, self.requests, self.replies)

    def links(self) -> _Links:
        assert self.bulk is not None and self.requests is not None and self.replies is not None
        return _Links(self.bulk, self.requests, self.replies)

    def close(self) -> None:
        for name in ("bulk", "requests", "replies"):
            fs = getattr(self, name)
            if fs is not None:
                fs.close()
            setattr(self, name, None)


class _Silent(MigrateError):
    """A connection that did not say a word in time: a flood, not a destination."""


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
        sp = cfg.spec  # what a new session's bulk connection tells the destination, and every connection checks
        self.info = p.GuestInfo(sp.pages, sp.vcpus, int(sp.workload), sp.seed, sp.zero_permille, sp.rate, cfg.mode)
        self.guest: Guest | None = None
        self.remaining = Remaining([(0, cfg.spec.pages)])
        self.session: _Session | None = None
        self._paired = trio.Event()
        self.rejected_peers = 0
        self.dropped_peers = 0
        # Counters of the native sender and request server, each written by that loop alone.
        self.stream_stats = ffi.new("send_stats_t *")
        self.serve_stats = ffi.new("send_stats_t *")
        self.notes = ffi.new("note_ring_t *")
        self._note_buf = ffi.new("struct wire_run[]", lib.NOTE_RING)
        # The stream's token bucket: the streamer task's alone, kept across windows and sessions.
        self.pacer = ffi.new("pacer_t *")
        self.pacer.rate = cfg.max_bandwidth
        self.pacer.burst = max(MIN_BURST_BYTES, round(cfg.max_bandwidth * BURST_S))
        self.pacer.quantum = max(MIN_QUANTUM_BYTES, round(cfg.max_bandwidth * QUANTUM_S))
        self.window_pages = WINDOW_PAGES if not cfg.max_bandwidth else max(
            MIN_WINDOW_PAGES, min(WINDOW_PAGES, round(cfg.max_bandwidth * WINDOW_S / p.PAGE_SIZE)))
        self.policy = prepage.make(cfg.prepage)
        self.stream_timeline: list[tuple[float, int]] = []
        self._pending = 0  # handshakes in progress
        self._max_pending = cfg.max_pending
        self._accept_warning = _Throttled()
        self._drop_warning = _Throttled()
        self._silent_warning = _Throttled()
        self.dest_counters: dict[str, float] = {}
        self.progress = Progress()
        # Dirty tracking and the precopy rounds: only the kernel's scan results are kept.
        self.tracker: DirtyTracker | None = None
        self.phase = Phase.ROUNDS
        self.round = 0  # the precopy round under way; 0 before the first
        self.round_set: Runs | None = None  # what the round under way sends (None: round 1, every page)
        self._last_round = False  # the round under way is estimated short enough to switch over after it
        self.pending: Runs | None = None  # written during the last round when the rounds stopped converging
        self._discard_round = False  # hybrid, not converging: the round under way discards pending there
        self.final_last: Runs | None = None  # the scan with the vCPUs stopped: written since the previous scan
        self.final: Runs | None = None  # what the switchover discards or copies: final_last and pending
        self.first = Remaining([])  # working-set order: what the postcopy stream sends before the rest
        self.first_cursor = 0
        self.left_the_stream = 0  # pages this stream did not send, as the request server had sent them
        self.cpu_state: p.CpuState | None = None
        self.stopped_at_ns = 0  # when the last vCPU stopped (time.monotonic_ns)
        self._switch_confirmed = False  # the destination said its vCPUs run (Resume.started)
        self._ws_before: Runs | None = None  # postcopy, working-set order: written in the stretch before the last
        self.figures = _Figures()

    @property
    def _idle_ms(self) -> int:
        return max(1, round(self.cfg.link_timeout * 1000))

    # -- set-up ------------------------------------------------------------
    @property
    def _tracking(self) -> bool:
        """Whether this migration asks the kernel what the guest writes."""
        return self.cfg.mode is not p.Mode.postcopy or self.cfg.stream_order is StreamOrder.working_set

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> SourceStats:
        """Runs the guest, migrates it once, and returns the source's statistics.

        **Cancellation**: stops every native loop through its eventfd and waits
        for its thread, so no thread is left sending from guest memory; the
        vCPUs stay as they are (running, or stopped after the switchover) and
        the sockets close with the process, which is expected to exit.
        """
        if self._tracking:
            await trio.to_thread.run_sync(DirtyTracker.check)  # an old kernel says so now, not after --run-before
        self.guest = await trio.to_thread.run_sync(partial(Guest, self.spec, fill=True))
        self.guest.start()
        # --run-before counts guest time, not the fill before it; on trio's clock,
        # which is offset from time.monotonic() on purpose.
        t0 = trio.current_time()
        self.figures.t_guest = t0
        listener = await self._listen()
        self._max_pending = _fit_to_descriptors(self.cfg.max_pending)
        port = listener.getsockname()[1]
        log.info("guest of %d MiB with %d vCPUs running %s; listening on %s", self.spec.size >> 20,
                 self.spec.vcpus, self.spec.workload.name, format_address(self.cfg.host, port))
        task_status.started(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, listener)
            await self._wait_for_destination()
            if self.cfg.mode is p.Mode.postcopy and self._tracking:
                # Track writes over the last two stretches of WORKING_SET_S before switchover only.
                await trio.sleep_until(t0 + self.cfg.run_before - 2 * WORKING_SET_S)
                await self._start_tracking()
                await trio.sleep(WORKING_SET_S)
                assert self.tracker is not None
                self._ws_before = await trio.to_thread.run_sync(self.tracker.take)
                await trio.sleep_until(max(t0 + self.cfg.run_before, trio.current_time() + WORKING_SET_S))
            else:
                # Precopy rounds start after --run-before: the guest's pace until then is the baseline
                # its progress during the rounds is measured against.
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

    async def _accept_loop(self, listener: trio.socket.SocketType) -> None:
        """Accepts connections until cancelled: no peer and no shortage of resources ends it.

        Handshakes run in a nursery of their own, and each catches whatever
        its peer provokes: nothing a stranger does reaches the migration's
        nursery.  A failed accept (out of descriptors or memory) is logged and
        retried after a pause; the connection waits in the kernel's backlog
        meanwhile.  At most ``max_pending`` handshakes run at once, each
        holding a descriptor and a small buffer for up to
        ``--handshake-timeout``; a connection beyond that is closed at once
        (``dropped_peers``), and a destination tries again.
        """
        async with trio.open_nursery() as handshakes:
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
                    self.dropped_peers += 1
                    self._drop_warning.warn("dropped a connection from %s: %d handshakes already pending "
                                            "(--max-pending)", peer, self._pending)
                    continue
                self._pending += 1
                handshakes.start_soon(self._greet, sock, peer)

    async def _greet(self, sock: trio.socket.SocketType, peer: str) -> None:
        """Handshake of one incoming connection; a failure, of any kind, closes only that connection."""
        # The source receives control frames and page requests, never pages: its
        # Connection's receive buffer is sized for those (~128 KiB, not ~2.1 MiB).
        fs = FrameSocket(sock, p.Connection(p.Role.SOURCE, self.info), f"destination {peer}",
                         frame_timeout=self.cfg.link_timeout)
        joined = False
        try:
            tune(sock, self.cfg.link_timeout)
            with trio.fail_after(self.cfg.handshake_timeout):
                await self._handshake(fs)
            joined = True
        except _Silent as exc:
            self.rejected_peers += 1
            self._silent_warning.warn("closed %s: %s", peer, exc)
        except Exception as exc:  # whatever a stranger provokes (a reset, garbage, a bug it finds) is its own
            self.rejected_peers += 1
            if isinstance(exc, trio.TooSlowError):
                reason = "handshake timed out"
            elif isinstance(exc, (MigrateError, OSError)):
                reason = str(exc) if isinstance(exc, MigrateError) else f"{exc.strerror or exc}"
            else:  # never expected: named, so that it can be reported, but it ends this connection only
                reason = f"unexpected {type(exc).__name__}: {exc}"
            hint = getattr(exc, "hint", None)
            log.warning("rejected %s: %s%s", peer, printable(reason), f" (hint: {hint})" if hint else "")
            if fs.writable:
                await self._refuse(fs, reason)
        finally:
            self._pending -= 1
            if not joined:  # a connection of the session is closed by the migration, anything else here
                fs.close()

    @staticmethod
    async def _refuse(fs: FrameSocket, reason: str) -> None:
        """Tells a refused peer why, in an Error frame, within REFUSE_S; a peer that is gone is not told."""
        with trio.move_on_after(REFUSE_S):
            try:
                await fs.send(p.Error(reason[:200]))
                # Closing with unread input would reset the connection, and a reset can
                # destroy our answer before the peer reads it: let the peer close first.
                fs.sock.shutdown(trio.socket.SHUT_WR)
                while await fs.sock.recv(65536):
                    pass
            except (MigrateError, OSError):
                pass

    async def _wait_for_destination(self) -> None:
        """Waits until one destination has all its connections up.

        A destination that opened its bulk connection but not the others
        within ``--handshake-timeout`` (it died half-way) has its session
        dropped, so that it cannot hold the source for ever.
        """
        while not self._paired.is_set():
            with trio.move_on_after(0.5):
                await self._paired.wait()
            s = self.session
            if s is not None and not s.complete() and trio.current_time() - s.born > self.cfg.handshake_timeout:
                log.warning("dropped a session whose destination did not open all its connections within %g s",
                            self.cfg.handshake_timeout)
                s.close()
                self.session = None

    async def _first_bytes(self, sock: trio.socket.SocketType) -> bytes:
        """The connection's first bytes, peeked: a destination sends its preamble (or a TLS
        ClientHello) as soon as it connects, so a connection silent for FIRST_BYTES_S frees its
        handshake slot at once instead of after --handshake-timeout (an idle or slow-drip flood
        turns over ten times faster, and a destination arriving during one gets in)."""
        want = len(p.MAGIC) + 2  # the whole preamble; a ClientHello is longer
        # SO_RCVLOWAT: readable only once the whole preamble is there (or at EOF).
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVLOWAT, want)
        try:
            with trio.move_on_after(min(FIRST_BYTES_S, self.cfg.handshake_timeout)):
                await trio.lowlevel.wait_readable(sock)
                try:
                    first = await sock.recv(want, trio.socket.MSG_PEEK)
                except OSError as exc:  # reset before a word: a port scan, a health check
                    raise _Silent(f"connection reset before its first byte ({exc.strerror or exc})") from None
                if not first:
                    raise _Silent("closed before its first byte")
                return first
            raise _Silent(f"no preamble within {min(FIRST_BYTES_S, self.cfg.handshake_timeout):g} s")
        finally:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVLOWAT, 1)

    async def _start_tls(self, fs: FrameSocket, first: bytes) -> None:
        """TLS first, when configured.  A plaintext destination (its preamble comes first) is told
        in plaintext words why it is refused, rather than failing a TLS handshake it cannot read."""
        tls = self.cfg.tls
        if tls is None:
            if first[:1] == b"\x16":  # a TLS handshake record: answer before the client reads our Challenge
                raise RemoteProtocolError("the peer speaks TLS and this end does not",
                                          hint="give both sides --tls-cert, --tls-key and --tls-ca, or neither")
            return
        if first.startswith(p.MAGIC):
            raise PeerError("a plaintext destination: this source requires TLS",
                            hint="give migrate-dst --tls-cert, --tls-key and --tls-ca")
        await fs.start_tls(tls, None)

    async def _handshake(self, fs: FrameSocket) -> None:
        await self._start_tls(fs, await self._first_bytes(fs.sock))
        challenge = p.Challenge(p.new_nonce())
        await fs.send(challenge)
        hello = await fs.expect(p.Hello)
        p.check_hello(self.cfg.key, challenge, hello)
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
        await fs.send(p.welcome(self.cfg.key, challenge, hello, s.id))
        if hello.session == b"":
            await fs.send(self.info)
        if hello.channel is not p.Channel.BULK:
            mark_urgent(fs.sock)
        setattr(s, hello.channel.value, fs)
        log.info("%s: %s channel up", fs.peer, hello.channel.value)
        if s.complete():
            self._paired.set()

    # -- migration ---------------------------------------------------------
    async def _start_tracking(self) -> None:
        """Registers the guest for write tracking and write-protects all of it (20 ms per GiB)."""
        assert self.guest is not None
        self.tracker = await trio.to_thread.run_sync(DirtyTracker, self.guest.base, self.spec.pages)

    async def _migrate(self) -> SourceStats:
        s = self.session
        assert self.guest is not None and s is not None and s.complete()
        fig = self.figures
        fig.t_start, fig.steps_start = trio.current_time(), self.guest.live_steps()
        recoveries = 0
        resume: p.Resume | None = None
        while True:
            links = s.links()
            try:
                if recoveries:
                    resume = await self._receive_resume(links.bulk)
                if self.phase is Phase.ROUNDS:
                    await self._rounds(links.bulk, resume)
                    await self._stop_guest()
                    resume = None  # the rounds took what it said
                await self._switchover(links.bulk, resume)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sample_stream, fig.t_switch)
                    nursery.start_soon(self._stream, links.bulk)
                    self.dest_counters = await self._serve_requests(links)
                    nursery.cancel_scope.cancel()
                failure = None
            except Exception as exc:
                failure = lost_link(exc)
                if failure is None:
                    raise
            # Closing after DestDone is the clean end: the destination waits for it.
            s.close()
            if failure is None:
                break
            self.progress.finish()
            recoveries += 1
            self._paired = trio.Event()
            log.warning("lost the destination (%s); waiting up to %g s for it to reconnect", failure,
                        self.cfg.reconnect_timeout)
            with trio.move_on_after(self.cfg.reconnect_timeout):
                await self._paired.wait()
            if not self._paired.is_set():
                if self.phase is Phase.ROUNDS:
                    where = "the guest never left this host (it was still running here)"
                elif self._switch_confirmed or self.serve_stats.requests:
                    where = "the guest runs there with incomplete memory, and is stopped here"
                else:
                    # Never resumed here on our own: the CPU state may have arrived and the guest may
                    # run there; two running copies would diverge.
                    where = ("the switchover was sent but never confirmed: the guest may run there; it stays "
                             "stopped here, as two running copies would diverge")
                raise PeerError(f"the destination did not come back within {self.cfg.reconnect_timeout:g} s; {where}",
                                hint="restart the migration from scratch")
        self.progress.finish()
        if self.tracker is not None:
            self.tracker.close()
        return self._metrics(recoveries)

    def _metrics(self, recoveries: int) -> SourceStats:
        fig = self.figures
        total_s = time.monotonic() - fig.t_switch
        stream, served = self.stream_stats, self.serve_stats
        before = fig.steps_start / max(fig.t_start - fig.t_guest, 1e-9)
        during = ratio = None
        if self.cfg.mode is not p.Mode.postcopy:
            during = (fig.steps_stop - fig.steps_start) / max(fig.t_stop - fig.t_start, 1e-9)
            # The live count moves by up to 1024 steps per vCPU (64 when rate-limited): a ratio from
            # fewer than a hundred such strides is noise.
            if fig.steps_start >= 100 * (64 if self.spec.rate else 1024) * self.spec.vcpus:
                ratio = round(during / before, 3)
        stats = SourceStats(
            mode=self.cfg.mode.name, stream_order=self.cfg.stream_order.value,
            pages_streamed=stream.pages, pages_requested=served.pages, requests=served.requests,
            rejected_peers=self.rejected_peers, dropped_peers=self.dropped_peers,
            pages_total=self.spec.pages, total_s=round(total_s, 3),
            migration_s=round(trio.current_time() - fig.t_start, 3),
            precopy_s=round(fig.t_stop - fig.t_start, 3) if during is not None else 0.0,
            bytes_bulk=stream.bytes, bytes_urgent=served.bytes, bytes_sent_total=stream.bytes + served.bytes,
            recoveries=recoveries,
            tls=self.cfg.tls.negotiated if self.cfg.tls else "plaintext",
            tls_rekeys=self.cfg.tls.rekeys if self.cfg.tls else 0,
            request_held_us=Histogram.from_c(served.held).summary(), notes_dropped=self.notes.dropped,
            max_bandwidth_bytes_per_s=self.cfg.max_bandwidth, prepage=self.cfg.prepage,
            prepage_stats=self.policy.statistics(), window_pages=self.window_pages,
            pacer_waits=self.pacer.waits, pacer_waited_ms=round(self.pacer.waited_ns / 1e6, 3),
            stream_timeline=tuple(self.stream_timeline),
            rss_mib=rss_mib(), guest_mib=self.spec.size / 2**20, vcpu_steps=tuple(self.guest.steps()),
            rounds=tuple(Round(**entry) for entry in fig.rounds),
            guest_steps_per_s=GuestPace(before=round(before), during_precopy=None if during is None else round(during),
                                        ratio=ratio),
            switchover=Switchover(dirty_pages=self.final.pages if self.final else 0,
                                  pages_discarded=fig.discarded_at_switchover,
                                  stop_and_copy_pages=fig.stop_and_copy_pages,
                                  stopped_to_cpu_state_ms=round(fig.switch_ms, 3),
                                  working_set_pages=fig.working_set_pages),
            first_window=fig.first_window,
        )
        log.info("done in %.2f s: %d pages streamed, %d sent on request (%d requests); destination placed %s",
                 total_s, stream.pages, served.pages, served.requests, self.dest_counters.get("pages_placed", "?"))
        return stats

    async def _rounds(self, bulk: FrameSocket, resume: p.Resume | None) -> None:
        """Precopy rounds while the guest runs here, until they converge or --precopy-rounds is reached.

        Each round is acknowledged before the next scan, so at most one
        round's pages are unconfirmed: after a lost link, that round is sent
        again whole, with what the destination's kernel lacks.
        """
        if self.cfg.mode is p.Mode.postcopy:
            return
        assert self.guest is not None
        if self.round == 0:
            await self._start_tracking()  # protects every page: round 1 reads each after that
            self.round = 1
        st, fig = self.stream_stats, self.figures
        again: list[tuple[int, int]] | None = None
        if resume is not None:
            # A replaced page that did not arrive is stale there, not absent: the round goes again whole
            # (a discarding round: its discards again, and what is absent as pages).
            again = list(resume.runs)
            if self.round_set is not None and not self._discard_round:
                again += self.round_set.as_list()
        while True:
            n = self.round
            flags = lib.WIRE_REPLACE if n > 1 else 0
            resent = again is not None
            discards = self.round_set if self._discard_round else None
            if again is not None:
                left = Remaining(again)
                for start, count in (discards.as_list() if discards else []):
                    left.discard(start, count)  # dropped again below: no use sending them first
                runs = left.runs()
                array, count = ffi.new("struct wire_run[]", [{"start": a, "count": b} for a, b in runs]), len(runs)
                pages = sum(b for _, b in runs)
                again = None
            elif self.round_set is None:
                array, count, pages = ffi.new("struct wire_run[]", [{"start": 0, "count": self.spec.pages}]), 1, \
                    self.spec.pages
            elif discards is not None:
                array, count, pages = None, 0, 0
            else:
                array, count, pages = self.round_set.array, self.round_set.n, self.round_set.pages
            await bulk.send(p.Round(n, pages + (discards.pages if discards else 0)))
            t0, pages0, bytes0, discards0 = trio.current_time(), st.pages, st.bytes, st.discards
            if count:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._show_round, n, pages0, pages)
                    await run_native(lib.src_send_runs, self.guest.base, self.spec.pages, bulk.link, array,
                                     count, flags, self.pacer, self._idle_ms, st, peer=bulk.peer)
                    nursery.cancel_scope.cancel()
            if discards is not None and discards.n:
                await run_native(lib.src_send_discards, self.spec.pages, bulk.link, discards.array, discards.n,
                                 self._idle_ms, st, peer=bulk.peer)
            await bulk.send(p.RoundEnd(n))
            # Of round n (the protocol's state checks the number): the destination has all the round's
            # frames once it acknowledges, so silence for a link's timeout means a lost link.
            await bulk.expect(p.RoundAck, within=self.cfg.link_timeout)
            seconds = trio.current_time() - t0
            sent = st.pages - pages0
            entry: dict[str, object] = {"round": n, "pages": sent, "bytes": st.bytes - bytes0,
                                        "seconds": round(seconds, 4), "dirty_pages_found": None}
            if discards is not None:
                entry["discarded"] = st.discards - discards0
            if resent:
                entry["resent_after_recovery"] = True
            fig.rounds.append(entry)
            fig.round_bytes += st.bytes - bytes0
            fig.round_s += seconds
            if n >= self.cfg.precopy_rounds or self._last_round or discards is not None:
                log.info("round %d: %d pages in %.3f s; switching over", n, sent, seconds)
                return
            found = await trio.to_thread.run_sync(self.tracker.take)  # type: ignore[union-attr]
            entry["dirty_pages_found"] = found.pages
            # The switchover threshold: what is written would take at most switchover_ms to send, at
            # the pace of the rounds so far (bytes, so zero pages do not flatter the estimate).
            rate = fig.round_bytes / max(fig.round_s, 1e-9)
            estimate_ms = found.pages * PAGE_SIZE / max(rate, 1.0) * 1000
            log.info("round %d: %d pages in %.3f s; %d written meanwhile (%.1f ms to send)", n, sent, seconds,
                     found.pages, estimate_ms)
            if found.pages == 0:
                return  # nothing written since: the switchover has nothing left to send
            # Against the round's whole set: a round sent again after a lost link sends part of it,
            # while the guest wrote for the whole round and the outage.
            planned = self.spec.pages if self.round_set is None else self.round_set.pages
            if found.pages >= NOT_CONVERGING * max(sent, planned):
                # No use sending them again while the guest runs: they join the final set.
                self.pending = found
                if self.cfg.mode is p.Mode.precopy:
                    log.info("the rounds do not converge (%d pages written during a round of %d): switching over",
                             found.pages, max(sent, planned))
                    return
                # Hybrid: the destination drops them now, while the guest still runs here, rather than
                # inside the downtime (dropping costs per page); postcopy brings them.  The switchover
                # then discards only what is written between this scan and the vCPUs' stop.
                log.info("the rounds do not converge (%d pages written during a round of %d): discarding them "
                         "there now; postcopy brings them after the switchover", found.pages, max(sent, planned))
                self._discard_round = True
            self._last_round = estimate_ms <= self.cfg.switchover_ms
            self.round, self.round_set = n + 1, found

    async def _show_round(self, n: int, pages0: int, pages: int) -> None:
        while True:
            done = self.stream_stats.pages - pages0
            self.progress.update(f"round {n}: sent {done}/{pages} pages ({100 * done / max(pages, 1):.0f}%)")
            await trio.sleep(0.1)

    async def _stop_guest(self) -> None:
        """Stops the vCPUs and, with rounds, scans what they wrote since the last one: the final dirty set."""
        assert self.guest is not None
        guest, fig = self.guest, self.figures

        def stop_and_scan() -> None:
            guest.stop()
            if self.cfg.mode is not p.Mode.postcopy:
                # In the same thread: no extra hop inside the downtime.
                tracker = self.tracker
                assert tracker is not None
                self.final_last = last = tracker.take()
                self.final = tracker.union(self.pending, last) if self.pending is not None else last

        await trio.to_thread.run_sync(stop_and_scan)
        fig.t_stop, fig.t_switch = trio.current_time(), time.monotonic()
        fig.steps_stop = sum(guest.steps())
        if self.final_last is not None and fig.rounds and fig.rounds[-1]["dirty_pages_found"] is None:
            fig.rounds[-1]["dirty_pages_found"] = self.final_last.pages  # written during the last round
        # Downtime starts when the last vCPU stopped, on this host's monotonic clock; the CPU state
        # carries the time since then, stamped as it is sent.
        self.stopped_at_ns = guest.stopped_at_ns()
        self.cpu_state = p.CpuState(tuple(guest.export_state()), 0)
        self.phase = Phase.SWITCHED

    async def _switchover(self, bulk: FrameSocket, resume: p.Resume | None) -> None:
        """Sends the switchover (discards or stop-and-copy, then the CPU state), unless the destination has it.

        Sets what the postcopy stream then sends: ``remaining``, and ``first``
        in working-set order.
        """
        assert self.guest is not None and self.cpu_state is not None
        self.first_cursor = 0
        self.policy = prepage.make(self.cfg.prepage)  # after a lost link, what it knew of faults is stale
        if resume is not None and resume.started:
            # The destination runs the guest: its kernel's absent pages are all that is left.
            self.remaining, self.first = Remaining(list(resume.runs)), Remaining([])
            return
        absent = list(resume.runs) if resume is not None else []
        mode, st, fig, final = self.cfg.mode, self.stream_stats, self.figures, self.final
        if mode is p.Mode.hybrid:
            # Everything written since the last scan is stale there; what was pending then was discarded
            # by the last round already (and nothing placed since).
            last = self.final_last
            assert last is not None
            await bulk.send(p.Round(self.round + 1, last.pages, final=True))
            discards0 = st.discards
            if last.n:
                await run_native(lib.src_send_discards, self.spec.pages, bulk.link, last.array, last.n,
                                 self._idle_ms, st, peer=bulk.peer)
            fig.discarded_at_switchover = st.discards - discards0
        elif mode is p.Mode.precopy:
            assert final is not None
            array, count, pages = final.array, final.n, final.pages
            if absent:
                runs = Remaining(final.as_list() + absent).runs()
                array, count = ffi.new("struct wire_run[]", [{"start": a, "count": b} for a, b in runs]), len(runs)
                pages = sum(b for _, b in runs)
            await bulk.send(p.Round(self.round + 1, pages, final=True))
            pages0 = st.pages
            if count:
                # Inside the downtime: never capped.
                await run_native(lib.src_send_runs, self.guest.base, self.spec.pages, bulk.link, array, count,
                                 lib.WIRE_REPLACE, ffi.NULL, self._idle_ms, st, peer=bulk.peer)
            fig.stop_and_copy_pages = st.pages - pages0
        await bulk.send(dataclasses.replace(self.cpu_state, stopped_ns_ago=time.monotonic_ns() - self.stopped_at_ns))
        if resume is None:
            fig.switch_ms = (time.monotonic_ns() - self.stopped_at_ns) / 1e6
        log.info("switchover: vCPUs stopped after %d steps; %s", sum(self.guest.steps()), {
            p.Mode.postcopy: f"streaming {self.spec.pages} pages",
            p.Mode.hybrid: f"{fig.discarded_at_switchover} pages written since the last scan discarded there",
            p.Mode.precopy: f"{fig.stop_and_copy_pages} pages copied with the vCPUs stopped",
        }[mode])
        # What postcopy streams, built after the CPU state left: not inside the downtime.
        if mode is p.Mode.hybrid:
            assert final is not None
            self.remaining = Remaining(final.as_list() + absent)
        elif mode is p.Mode.precopy:
            self.remaining = Remaining([])
        else:
            self.remaining = Remaining(absent) if resume is not None else Remaining([(0, self.spec.pages)])
        self.first = Remaining([])
        if self.cfg.stream_order is StreamOrder.working_set:
            if mode is p.Mode.postcopy and self._ws_before is not None and fig.working_set_pages is None:
                tracker = self.tracker
                assert tracker is not None
                last = await trio.to_thread.run_sync(tracker.take)
                ws = tracker.intersection(self._ws_before, last)
                self.first = Remaining(ws.as_list())
                fig.working_set_pages = ws.pages
                log.info("working set: %d pages written in each of the last two %.0f ms stretches go first",
                         ws.pages, WORKING_SET_S * 1e3)
            elif mode is p.Mode.hybrid and self.final_last is not None and resume is None:
                # What is left is what the guest wrote during the last round, and, when the rounds
                # stopped converging, since the scan before: that last stretch goes first.
                self.first = Remaining(self.final_last.as_list())
                fig.working_set_pages = self.final_last.pages

    async def _receive_resume(self, bulk: FrameSocket) -> p.Resume:
        """After a reconnection: what the destination's kernel lacks, and whether its vCPUs run."""
        runs: list[tuple[int, int]] = []
        while True:
            # The protocol's state bounds the pages of all the frames by the guest's; as a run holds a
            # page at least, that bounds the run list too, however many frames say "more".
            resume = await bulk.expect(p.Resume, within=self.cfg.link_timeout)
            runs += resume.runs
            if not resume.more:
                break
        self._switch_confirmed |= resume.started
        pages = sum(count for _, count in runs)
        log.info("destination back: it lacks %d pages in %d runs; its vCPUs %s", pages, len(runs),
                 "run" if resume.started else "wait for the switchover")
        return p.Resume(tuple(runs), started=resume.started)

    def _take_notes(self) -> None:
        """Pages the request server sent leave the stream, and the policy hears of each fault."""
        while n := lib.notes_take(self.notes, self._note_buf, lib.NOTE_RING):
            for i in range(n):
                start, count = self._note_buf[i].start, self._note_buf[i].count
                self.left_the_stream += self.remaining.discard(start, count)
                self.first.discard(start, count)
                self.policy.fault(start, count)
            # In working-set order the stream goes on through the set from just after the last
            # request; the policy decides for the rest.
            self.first_cursor = self._note_buf[n - 1].start + self._note_buf[n - 1].count

    async def _sample_stream(self, t0: float) -> None:
        """Samples the stream's bytes every TIMELINE_INTERVAL for the metrics (bounded)."""
        while len(self.stream_timeline) < MAX_TIMELINE:
            self.stream_timeline.append((round(time.monotonic() - t0, 3), self.stream_stats.bytes))
            await trio.sleep(TIMELINE_INTERVAL)

    def _next_window(self) -> list[tuple[int, int]]:
        """The next runs to stream: the working set first (in working-set order), then what the
        pre-paging policy picks from the rest."""
        if self.first:
            runs = sorted(self.first.take_pages(self.first_cursor, self.window_pages))
            self.first_cursor = runs[-1][0] + runs[-1][1]
            for start, count in runs:
                self.remaining.discard(start, count)
        else:
            runs = self.policy.next_window(self.remaining, self.window_pages)
        if runs and self.figures.first_window is None:
            self.figures.first_window = FirstWindow(pages=sum(n for _, n in runs), runs=len(runs),
                                                    start=runs[0][0], end=runs[-1][0] + runs[-1][1])
        return runs

    async def _stream(self, bulk: FrameSocket) -> None:
        """Streams what is left, a window at a time, from the native sender; then SourceDone.

        **Cancellation**: stops the sender through its eventfd and waits for it.
        """
        assert self.guest is not None
        t0 = time.monotonic()
        st = self.stream_stats
        sent_before, self.left_the_stream = st.pages, 0
        while True:
            self._take_notes()
            runs = self._next_window()
            if not runs:
                break
            arr = ffi.new("struct wire_run[]", [{"start": s, "count": n} for s, n in runs])
            await run_native(lib.src_send_runs, self.guest.base, self.spec.pages, bulk.link, arr, len(runs), 0,
                             self.pacer, self._idle_ms, st, peer=bulk.peer)
            done = st.pages + self.serve_stats.pages
            mbps = st.bytes / max(time.monotonic() - t0, 1e-9) / 1e6
            self.progress.update(f"sent {done}/{self.spec.pages} pages ({100 * min(done, self.spec.pages) / self.spec.pages:.0f}%), "
                                 f"{mbps:.0f} MB/s, {self.serve_stats.requests} requests")
        await bulk.send(p.SourceDone(st.pages - sent_before))
        log.info("stream complete: %d pages in %.2f s; %d more had gone on request", st.pages - sent_before,
                 time.monotonic() - t0, self.left_the_stream)
        # Everything is on its way, but a slow link may still carry megabytes of it: silence is
        # counted from when the destination's kernel acknowledged the last byte, not from now.
        await _drained(bulk, self.cfg.link_timeout)
        await trio.sleep(self.cfg.link_timeout)
        raise PeerError(f"{bulk.peer} did not confirm within {self.cfg.link_timeout:g} s of receiving the whole "
                        "stream")

    async def _serve_requests(self, links: _Links) -> dict[str, float]:
        """Runs the native request server (requests in on one connection, replies out on another)
        until the destination says every page is placed; returns its counters.

        DestDone comes after the last request on the same connection, so the
        request server hands it over and each connection keeps one user.

        **Cancellation**: stops the server through its eventfd and waits for it.
        """
        assert self.guest is not None
        req = links.requests
        await run_native(lib.src_serve_loop, self.guest.base, self.spec.pages, req.link, req.conn.rx,
                         links.replies.link, self._idle_ms, self.serve_stats, self.notes, peer=req.peer)
        # The loop returns at a control frame: DestDone is the only one the requests allow (an Error raises).
        done = await req.expect(p.DestDone)
        return done.counters


async def _drained(fs: FrameSocket, link_timeout: float) -> None:
    """Returns once the peer's kernel has acknowledged every byte sent on ``fs``; PeerError if it takes
    none for ``link_timeout``."""
    queued, deadline = _unacknowledged(fs), trio.current_time() + link_timeout
    while queued:
        await trio.sleep(DRAIN_POLL_S)
        now, before, queued = trio.current_time(), queued, _unacknowledged(fs)
        if queued < before:
            deadline = now + link_timeout
        elif now >= deadline:
            raise PeerError(f"{fs.peer} took none of the stream's last {queued} bytes for {link_timeout:g} s")


def _unacknowledged(fs: FrameSocket) -> int:
    """Bytes sent on ``fs`` that the peer's kernel has not acknowledged yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(fs.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


@dataclass
class _Figures:
    """Times and counts for the metrics (trio's clock unless named otherwise)."""

    t_guest: float = 0.0  # the guest started
    t_start: float = 0.0  # the migration began: the first round, or the switchover in postcopy
    t_stop: float = 0.0  # the vCPUs stopped
    t_switch: float = 0.0  # the same, time.monotonic()
    steps_start: int = 0
    steps_stop: int = 0
    switch_ms: float = 0.0  # the vCPUs' stop (their own clock) to the CPU state sent
    stop_and_copy_pages: int = 0
    discarded_at_switchover: int = 0
    working_set_pages: int | None = None
    rounds: list[dict[str, object]] = field(default_factory=list)  # each a Round's fields, filled in as scans come
    round_bytes: int = 0
    round_s: float = 0.0
    first_window: FirstWindow | None = None  # what the postcopy stream sent first


async def serve(cfg: SourceConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> SourceStats:
    """Runs one source until its guest has been migrated; returns its statistics."""
    return await Source(cfg).run(task_status=task_status)
