"""Who may join the migration: listening, accepting, the handshake, and the session it joins.

A destination opens three connections (bulk, requests, replies).  Each is
accepted (with a back-off when accepting fails), its first bytes peeked (a
connection silent for a second is a flood, not a destination), TLS started
or refused by those bytes, then the handshake: our Challenge, its Hello (the
key's proof and the session it joins), our Welcome.  The first bulk
connection opens the session; the others join it by its id.  ``wait_paired``
returns once one destination has all three up.

Handshakes run in a nursery of their own and each catches whatever its peer
provokes, so that nothing a stranger does can reach the migration's nursery.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import resource
import secrets
from dataclasses import dataclass, field

import trio

from .. import protocol as p
from ..errors import MigrateError, PeerError, RemoteProtocolError, UsageError, printable
from ..wire import FrameSocket, family_of, format_address, mark_urgent, tune
from .config import SourceConfig

log = logging.getLogger(__package__)

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
# A refused peer is told why (an Error frame) within this long, or not at all.
REFUSE_S = 1.0
# A warning that a flood could repeat thousands of times is logged at most this often.
WARN_INTERVAL = 2.0
# How often wait_paired looks for a session whose destination died half-way.
PAIRING_POLL_S = 0.5


@dataclass
class Links:
    """One session's three connections, once all are up."""

    bulk: FrameSocket
    requests: FrameSocket
    replies: FrameSocket


@dataclass
class Session:
    """The one migration in progress: its id and its connections (None while lost)."""

    id: bytes
    born: float = field(default_factory=trio.current_time)
    bulk: FrameSocket | None = None
    requests: FrameSocket | None = None
    replies: FrameSocket | None = None

    def complete(self) -> bool:
        return None not in (self.bulk, self.requests, self.replies)

    def links(self) -> Links:
        assert self.bulk is not None and self.requests is not None and self.replies is not None
        return Links(self.bulk, self.requests, self.replies)

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


class Admission:
    """Admits one destination's connections to one session, and turns everyone else away.

    Args:
        cfg: the address, the key, TLS, and the handshake's limits.
        info: what a new session's bulk connection is told, and every connection checks.
    """

    def __init__(self, cfg: SourceConfig, info: p.GuestInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.session: Session | None = None
        self._paired = trio.Event()
        self.rejected_peers = 0
        self.dropped_peers = 0
        self._pending = 0  # handshakes in progress
        self._max_pending = cfg.max_pending
        self._accept_warning = _Throttled()
        self._drop_warning = _Throttled()
        self._silent_warning = _Throttled()

    async def listen(self) -> trio.socket.SocketType:
        """Binds and listens; says where on stdout (and in ``--ready-file``).

        Raises:
            UsageError: the address cannot be listened on.
        """
        cfg = self.cfg
        sock = trio.socket.socket(family_of(cfg.host))
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {format_address(cfg.host, cfg.port)}: {exc.strerror}",
                             hint="choose another port with --listen HOST:PORT (port 0 picks a free one)") from None
        sock.listen(LISTEN_BACKLOG)
        address = format_address(*sock.getsockname()[:2])
        print(json.dumps({"listening": address}), flush=True)
        if cfg.ready_file:
            with open(cfg.ready_file, "w") as f:
                f.write(f"{address}\n")
        self._max_pending = _fit_to_descriptors(cfg.max_pending)
        return sock

    async def accept_loop(self, listener: trio.socket.SocketType) -> None:
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

    async def wait_paired(self) -> Session:
        """Waits until one destination has all its connections up; returns its session.

        A destination that opened its bulk connection but not the others
        within ``--handshake-timeout`` (it died half-way) has its session
        dropped, so that it cannot hold the source for ever.
        """
        while not self._paired.is_set():
            with trio.move_on_after(PAIRING_POLL_S):
                await self._paired.wait()
            s = self.session
            if s is not None and not s.complete() and trio.current_time() - s.born > self.cfg.handshake_timeout:
                log.warning("dropped a session whose destination did not open all its connections within %g s",
                            self.cfg.handshake_timeout)
                s.close()
                self.session = None
        assert self.session is not None
        return self.session

    async def wait_rejoined(self, timeout: float) -> bool:
        """After the session's links were closed: whether its destination reconnected all of them within
        ``timeout``."""
        self._paired = trio.Event()
        with trio.move_on_after(timeout):
            await self._paired.wait()
        return self._paired.is_set()

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
                await _refuse(fs, reason)
        finally:
            self._pending -= 1
            if not joined:  # a connection of the session is closed by the migration, anything else here
                fs.close()

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
            self.session = s = Session(secrets.token_bytes(16))
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
