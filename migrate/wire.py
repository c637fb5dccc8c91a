"""A protocol Connection bound to a trio socket: the only place frames meet the network."""

from __future__ import annotations

import socket as _stdsocket

import trio

from .errors import PeerError, RemoteProtocolError, UsageError
from .protocol import CLOSED, NEED_DATA, Connection, Error, Event

# Large kernel buffers keep the bulk stream flowing while the receiver places
# a run; 4 MiB matches a few frames in flight.
SOCKET_BUFFER = 4 << 20


def tune(sock: trio.socket.SocketType) -> None:
    """TCP_NODELAY so a page request leaves at once; big buffers for the stream."""
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    for opt in (_stdsocket.SO_SNDBUF, _stdsocket.SO_RCVBUF):
        sock.setsockopt(_stdsocket.SOL_SOCKET, opt, SOCKET_BUFFER)


class FrameSocket:
    """Sends and receives protocol events over one connected socket.

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
                while chunks and n >= len(chunks[0]):
                    n -= len(chunks.pop(0))
                if n:
                    chunks[0] = chunks[0][n:]
        except OSError as exc:
            raise PeerError(f"lost the connection to {self.peer}: {exc.strerror}") from None

    async def receive(self) -> Event:
        """Reads the next event; a payload view stays valid until the next ``receive``.

        Raises:
            PeerError: the peer closed the connection or sent an Error.
            RemoteProtocolError: the peer sent malformed input.
        """
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                view = self.conn.receive_buffer()
                try:
                    n = await self.sock.recv_into(view)
                except OSError as exc:
                    raise PeerError(f"lost the connection to {self.peer}: {exc.strerror}") from None
                finally:
                    view.release()
                self.bytes_in += n
                self.conn.commit(n)
            elif event is CLOSED:
                raise PeerError(f"{self.peer} closed the connection")
            elif isinstance(event, Error):
                raise PeerError(f"{self.peer} reported: {event.message}")
            else:
                return event

    async def expect(self, kind: type) -> Event:
        """Receives one event that must be of ``kind``."""
        event = await self.receive()
        if not isinstance(event, kind):
            raise RemoteProtocolError(f"expected {kind.__name__} from {self.peer}, got {type(event).__name__}")
        return event

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


async def connect(host: str, port: int) -> trio.socket.SocketType:
    """Connects a tuned TCP socket, turning the usual failures into one-line errors."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        # trio reports "all attempts failed" and chains the per-address errors.
        causes = getattr(exc.__cause__, "exceptions", [exc.__cause__ or exc])
        reason = "; ".join(sorted({c.strerror or str(c) for c in causes if isinstance(c, OSError)})) or str(exc)
        raise UsageError(f"cannot connect to {host}:{port}: {reason}",
                         hint=f"is migrate-src running and listening on {host}:{port}?") from None
    sock = stream.socket
    tune(sock)
    return sock
