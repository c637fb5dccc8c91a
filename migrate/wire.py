"""A protocol Connection bound to a socket, plaintext or TLS: where Python's frames meet the network."""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import select
import socket as _stdsocket
from typing import Callable

import trio

from ._native import ffi, lib
from .errors import PeerError, PeerGone, RemoteProtocolError, UsageError, printable
from .protocol import CLOSED, NEED_DATA, Connection, Error, Event



def tune(sock: trio.socket.SocketType, link_timeout: float) -> None:
    """TCP_NODELAY, so that a page request or a small reply leaves at once; and a peer host that
    vanishes (power loss, a dropped route: no FIN, no RST) is noticed within about ``link_timeout``.

    Keepalive probes prove the peer's host alive while the connection is idle
    (the wait before a switchover can be long and silent): ``TCP_KEEPCNT``
    unanswered probes end it.  ``TCP_USER_TIMEOUT`` bounds how long sent data
    may stay unacknowledged, and overrides the keepalive's count; both make a
    blocked read or write fail with ``ETIMEDOUT``, a lost link.

    Socket buffer sizes are deliberately left alone: setting SO_SNDBUF or
    SO_RCVBUF switches off the kernel's autotuning for that socket, and the
    value is silently clamped to ``net.core.wmem_max``/``rmem_max`` (often
    ~208-416 KiB), whereas autotuning grows a busy connection's buffers up to
    ``net.ipv4.tcp_wmem``/``tcp_rmem`` (several MiB) on its own and keeps idle
    ones small.
    """
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    idle = max(1, math.ceil(link_timeout / 2))
    interval = max(1, math.ceil(link_timeout / (2 * KEEPALIVE_PROBES)))
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_KEEPALIVE, 1)
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_KEEPIDLE, idle)
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_KEEPINTVL, interval)
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_USER_TIMEOUT, max(1000, round(link_timeout * 1000)))


# Unanswered keepalive probes that end a connection (see tune).
KEEPALIVE_PROBES = 3


# The urgent connections (requests, replies) are marked DSCP EF (Expedited
# Forwarding, RFC 3246), so that a bottleneck that honours DiffServ serves a
# page a vCPU waits for ahead of the bulk stream queued there (bench/wan.py
# measures the difference), and given the interactive priority, which this
# host's own qdiscs honour.  The bulk connection is left unmarked.
URGENT_TOS = 0xB8
URGENT_PRIORITY = 6  # TC_PRIO_INTERACTIVE: allowed without CAP_NET_ADMIN


def mark_urgent(sock: trio.socket.SocketType) -> None:
    """Marks a connection that carries page requests or replies (see URGENT_TOS)."""
    if sock.family == _stdsocket.AF_INET6:
        sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_TCLASS, URGENT_TOS)
    else:
        sock.setsockopt(_stdsocket.IPPROTO_IP, _stdsocket.IP_TOS, URGENT_TOS)
    # After IP_TOS, which sets a priority of its own.
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_PRIORITY, URGENT_PRIORITY)


def _vet(event: Event | object, peer: str) -> Event | None:
    """The next event, or None when more data is needed; a close or an Error from the peer raises."""
    if event is NEED_DATA:
        return None
    if event is CLOSED:
        raise PeerGone(f"{peer} closed the connection")
    if isinstance(event, Error):
        # The text is the peer's, possibly not yet authenticated: escaped before any log sees it.
        raise PeerError(f"{peer} reported: {printable(event.message)}")
    return event  # type: ignore[return-value]


def _lost(peer: str, rc: int, why: object) -> PeerGone:
    return PeerGone(f"lost the connection to {peer}: {_text(why)}: {os.strerror(-rc)}")


def _text(why: object) -> str:
    return ffi.string(why[0]).decode(errors="replace") if why[0] else "?"  # type: ignore[index]


class TlsConfig:
    """This end's TLS 1.3 context: its certificate and key, and the CA its peers must chain to.

    Raises:
        UsageError: a file cannot be read or the key does not match the certificate.
    """

    def __init__(self, server: bool, cert: str, key: str, ca: str, rekey_bytes: int = 0) -> None:
        self.rekey_bytes = rekey_bytes  # a key update every this many bytes sent (0: OpenSSL's own limits)
        self.negotiated = ""  # protocol and cipher of the last handshake, for the metrics
        self.rekeys = 0  # key updates sent on connections closed so far
        why = ffi.new("char **")
        self.ctx = lib.tls_context(int(server), cert.encode(), key.encode(), ca.encode(), why)
        if self.ctx == ffi.NULL:
            raise UsageError(f"TLS: {_text(why)}", hint="check --tls-cert, --tls-key and --tls-ca (PEM files)")
        self.ctx = ffi.gc(self.ctx, lib.tls_context_free)


class FrameSocket:
    """Sends and receives protocol events over one connected socket, plaintext or TLS.

    Bytes go through the native ``link_t`` (native/link.h), the same path the
    native loops use, so a connection can be handed to a loop and back.  One
    user at a time: a TLS session must never be used by two threads at once.
    ``bytes_in``/``bytes_out`` count what this object moved.

    Args:
        sock: a connected trio socket.
        conn: the sans-io protocol state for this connection.
        peer: a name for log lines and errors.
        frame_timeout: a frame begun must end within this many seconds: a peer
            that drips bytes is never silent (``--link-timeout``).
    """

    def __init__(self, sock: trio.socket.SocketType, conn: Connection, peer: str,
                 frame_timeout: float = math.inf) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = peer
        self.frame_timeout = frame_timeout
        self.link = ffi.new("link_t *", {"fd": sock.fileno()})
        self._tls: TlsConfig | None = None
        self._want = ffi.new("int *")
        self._why = ffi.new("char **")
        self.bytes_in = 0
        self.bytes_out = 0

    async def _link_io(self, fn: Callable[..., int], *args: object) -> int:
        """Calls a link function again after each ``-EAGAIN``, once the socket is ready; the one wait loop.

        ``fn`` is ``link_send``, ``link_recv`` or ``tls_handshake``, called as
        ``fn(self.link, *args, want, why)``.  ``-EAGAIN`` says in ``want`` which
        way to wait: TLS may need to write while reading, or read while writing.

        Returns:
            Its first other result: a byte count, 0, or ``-errno`` with ``why`` set.
        """
        while (rc := fn(self.link, *args, self._want, self._why)) == -errno.EAGAIN:
            if self._want[0] == select.POLLOUT:
                await trio.lowlevel.wait_writable(self.sock)
            else:
                await trio.lowlevel.wait_readable(self.sock)
        return rc

    async def start_tls(self, tls: TlsConfig, peer_host: str | None) -> None:
        """Runs the TLS handshake; a client (``peer_host`` given) checks the server's certificate names it.

        Raises:
            RemoteProtocolError: the handshake failed (certificate, protocol): final.
            PeerGone: the connection was reset or closed during it.
        """
        if lib.tls_attach(self.link, tls.ctx, peer_host.encode() if peer_host else ffi.NULL, self._why) < 0:
            raise RemoteProtocolError(_text(self._why))
        self.link.rekey_bytes = tls.rekey_bytes
        rc = await self._link_io(lib.tls_handshake)
        if rc == -errno.EPROTO:
            raise RemoteProtocolError(f"{_text(self._why)} (with {self.peer})",
                                      hint="both sides need --tls-cert/--tls-key/--tls-ca from the same CA; "
                                           "a plaintext peer answers TLS with 'wrong version number'")
        if rc < 0:
            raise _lost(self.peer, rc, self._why)
        self._tls = tls
        tls.negotiated = self.tls

    @property
    def tls(self) -> str:
        """``plaintext``, or the negotiated protocol and cipher."""
        return ffi.string(lib.tls_description(self.link)).decode()

    async def send_preamble(self) -> None:
        """Writes the preamble ahead of the first event (see ``Connection.preamble``)."""
        await self._write([self.conn.preamble()])

    async def send(self, event: Event) -> None:
        """Writes one event.

        **Cancellation**: a cancelled send may leave a partial frame; the
        connection must then be closed.
        """
        await self._write(self.conn.send(event))

    @property
    def writable(self) -> bool:
        """Whether a frame may still be written: TLS, if any, is established, and no frame was cut."""
        return not self.link.cut and (self.link.ssl == ffi.NULL or self._tls is not None)

    async def _write(self, chunks: list[bytes | memoryview]) -> None:
        if self.link.cut:
            # Part of an earlier frame is on the link (a native loop or a send was stopped in its
            # middle): what follows would be read as the rest of it.
            raise PeerGone(f"cannot write to {self.peer}: a frame sent on this connection was cut off")
        if len(chunks) > 1 and sum(len(c) for c in chunks) <= 65536:
            chunks = [b"".join(chunks)]  # a control frame leaves in one piece, one system call
        started = False
        try:
            for chunk in chunks:
                buf, left = ffi.from_buffer(chunk), len(chunk)
                while left:
                    n = await self._link_io(lib.link_send, buf + (len(chunk) - left), left)
                    if n <= 0:  # link_send never returns 0; were it to, looping on it would spin
                        raise _lost(self.peer, n or -errno.EPIPE, self._why)
                    started = True
                    self.bytes_out += n
                    left -= n
        except BaseException:
            if started or self.link.ssl != ffi.NULL:  # TLS: a write that must be retried is pending
                self.link.cut = 1
            raise
        await trio.lowlevel.checkpoint()

    async def receive(self) -> Event:
        """Reads the next event; a payload view stays valid until the next ``receive``.

        Raises:
            PeerError: the peer closed the connection or sent an Error.
            RemoteProtocolError: the peer sent malformed input.
        """
        begun = math.inf  # when part of a frame was here: the rest must follow within frame_timeout
        while (event := _vet(self.conn.next_event(), self.peer)) is None:
            if begun == math.inf and self.conn.rx.end > self.conn.rx.start:
                begun = trio.current_time()
            buf, space = self.conn.receive_space()
            with trio.move_on_at(begun + self.frame_timeout) as drip:
                n = await self._link_io(lib.link_recv, buf, space)
            if drip.cancelled_caught:
                raise PeerGone(f"{self.peer} began a frame but did not end it within {self.frame_timeout:g} s "
                               "(a drip)")
            if n < 0:
                raise _lost(self.peer, n, self._why)
            self.bytes_in += n
            self.conn.commit(n)
        await trio.lowlevel.checkpoint()
        return event

    async def expect(self, kind: type, within: float = math.inf) -> Event:
        """Receives one event that must be of ``kind``, within ``within`` seconds.

        Raises:
            PeerError: nothing came in time (a lost link), or as ``receive``.
            RemoteProtocolError: something else came.
        """
        with trio.move_on_after(within):
            event = await self.receive()
            if not isinstance(event, kind):
                raise RemoteProtocolError(f"expected {kind.__name__} from {self.peer}, got {type(event).__name__}")
            return event
        raise PeerError(f"{self.peer} sent no {kind.__name__} within {within:g} s")

    def abort(self) -> None:
        """Ends the connection both ways at once, waking every task or thread blocked on it."""
        try:
            self.sock.shutdown(_stdsocket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    def close(self) -> None:
        """Closes the connection; nobody may use it any more (the native loops are stopped first)."""
        if self.link.ssl != ffi.NULL:
            lib.tls_detach(self.link)
        if self._tls is not None:
            self._tls.rekeys += self.link.rekeys
            self._tls = None
        self.sock.close()


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``:PORT`` → (host, port), with a usage error for nonsense."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    try:
        value = int(port)
    except ValueError:
        raise UsageError(f"bad address {text!r}: port {port!r} is not a number", hint="use HOST:PORT") from None
    if not 0 <= value <= 65535:
        raise UsageError(f"bad address {text!r}: port out of range", hint="use a port in 0..65535")
    return host, value


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets so that ``parse_address`` reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: ``localhost``, 127.0.0.0/8 or ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it could resolve anywhere


def family_of(host: str) -> int:
    """AF_INET6 for an IPv6 literal (``::1``), AF_INET for everything else."""
    return _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET


async def connect(host: str, port: int, link_timeout: float) -> trio.socket.SocketType:
    """Connects a tuned TCP socket.

    Raises:
        UsageError: ``host`` does not resolve: trying again will not help.
        PeerGone: refused, reset or unreachable: worth trying again.
    """
    try:
        stream = await trio.open_tcp_stream(host, port)
    except _stdsocket.gaierror as exc:
        raise UsageError(f"cannot resolve {host}: {exc.strerror}", hint="check the host in --connect") from None
    except OSError as exc:
        # trio reports "all attempts failed" and chains the per-address errors.
        causes = getattr(exc.__cause__, "exceptions", [exc.__cause__ or exc])
        reason = "; ".join(sorted({c.strerror or str(c) for c in causes if isinstance(c, OSError)})) or str(exc)
        raise PeerGone(f"cannot connect to {format_address(host, port)}: {reason}",
                       hint=f"is migrate-src running and listening on {format_address(host, port)}?") from None
    sock = stream.socket
    tune(sock, link_timeout)
    return sock
