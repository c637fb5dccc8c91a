"""A protocol Connection bound to a trio socket: the only place frames meet the network."""

from __future__ import annotations

import ipaddress
import socket as _stdsocket

import trio

from .errors import PeerError, PeerGone, RemoteProtocolError, UsageError, printable
from .protocol import CLOSED, NEED_DATA, Connection, Error, Event



def tune(sock: trio.socket.SocketType) -> None:
    """TCP_NODELAY, so that a page request or a small reply leaves at once.

    Socket buffer sizes are deliberately left alone: setting SO_SNDBUF or
    SO_RCVBUF switches off the kernel's autotuning for that socket, and the
    value is silently clamped to ``net.core.wmem_max``/``rmem_max`` (often
    ~208-416 KiB), whereas autotuning grows a busy connection's buffers up to
    ``net.ipv4.tcp_wmem``/``tcp_rmem`` (several MiB) on its own and keeps idle
    ones small.
    """
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)


def _advance(chunks: list[memoryview], n: int) -> None:
    """Drops the first ``n`` bytes of ``chunks`` after a partial send."""
    while chunks and n >= len(chunks[0]):
        n -= len(chunks.pop(0))
    if n:
        chunks[0] = chunks[0][n:]


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


def _lost(peer: str, exc: OSError) -> PeerGone:
    return PeerGone(f"lost the connection to {peer}: {exc.strerror or exc}")


class FrameSocket:
    """Sends and receives protocol events over one connected trio socket.

    One task may send while another receives.  ``bytes_in``/``bytes_out``
    count everything on the wire.

    Args:
        sock: a connected trio socket.
        conn: the sans-io protocol state for this channel.
        peer: a name for log lines and errors.
    """

    def __init__(self, sock: trio.socket.SocketType, conn: Connection, peer: str) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = peer
        self.bytes_in = 0
        self.bytes_out = 0

    async def send(self, event: Event) -> None:
        """Writes one event.

        **Cancellation**: a cancelled send may leave a partial frame; the
        connection must then be closed.
        """
        chunks = [memoryview(c) for c in self.conn.send(event)]
        try:
            while chunks:
                n = await self.sock.sendmsg(chunks)
                self.bytes_out += n
                _advance(chunks, n)
        except OSError as exc:
            raise _lost(self.peer, exc) from None

    async def receive(self) -> Event:
        """Reads the next event; a payload view stays valid until the next ``receive``.

        Raises:
            PeerError: the peer closed the connection or sent an Error.
            RemoteProtocolError: the peer sent malformed input.
        """
        while (event := _vet(self.conn.next_event(), self.peer)) is None:
            with self.conn.receive_buffer() as view:
                try:
                    n = await self.sock.recv_into(view)
                except OSError as exc:
                    raise _lost(self.peer, exc) from None
            self.bytes_in += n
            self.conn.commit(n)
        return event

    async def expect(self, kind: type) -> Event:
        """Receives one event that must be of ``kind``."""
        event = await self.receive()
        if not isinstance(event, kind):
            raise RemoteProtocolError(f"expected {kind.__name__} from {self.peer}, got {type(event).__name__}")
        return event

    def abort(self) -> None:
        """Ends the connection both ways at once, waking every task or thread blocked on it."""
        try:
            self.sock.shutdown(_stdsocket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    def fileno(self) -> int:
        """The descriptor a native loop reads or writes once it owns a direction."""
        return self.sock.fileno()

    def close(self) -> None:
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


async def connect(host: str, port: int) -> trio.socket.SocketType:
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
    tune(sock)
    return sock
