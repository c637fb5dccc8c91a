"""wire.py: addresses, socket options, escaping of a peer's text (real sockets on 127.0.0.1)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import trio

from helpers import drip, hostile
from migrate import protocol as p
from migrate.errors import PeerError, PeerGone, printable
from migrate.protocol import codec
from migrate.source.streamer import drained
from migrate.wire import FrameSocket, connect, family_of, format_address, is_loopback, parse_address


@pytest.mark.parametrize("host,port,text", [
    ("127.0.0.1", 7450, "127.0.0.1:7450"),
    ("::1", 0, "[::1]:0"),
    ("fe80::1", 9, "[fe80::1]:9"),
    ("localhost", 1, "localhost:1"),
])
def test_addresses_read_back_what_they_print(host: str, port: int, text: str) -> None:
    """The source prints where it listens; --connect must read the same text, IPv6 included."""
    assert format_address(host, port) == text
    assert parse_address(text, 7450) == (host, port)


def test_ipv6_loopback_is_loopback_and_gets_an_ipv6_socket() -> None:
    """--listen [::1]:PORT needs no key (loopback) and an AF_INET6 socket to bind."""
    assert is_loopback("::1") and is_loopback("127.0.0.1") and is_loopback("127.8.9.10") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
    assert not is_loopback("127.evil.example")  # a name that merely starts like loopback
    assert family_of("::1") == socket.AF_INET6 and family_of("127.0.0.1") == socket.AF_INET


async def test_connections_leave_buffer_sizes_to_kernel_autotuning() -> None:
    """Fixed SO_RCVBUF/SO_SNDBUF switch autotuning off (and are clamped by net.core.*mem_max):
    our connections keep the kernel's own sizes, and TCP_NODELAY; keepalive and TCP_USER_TIMEOUT
    notice a vanished peer host within about --link-timeout (here 6 s)."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as plain:
            ours = await connect("127.0.0.1", port, 6.0)
            with ours:
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    assert ours.getsockopt(socket.SOL_SOCKET, opt) == plain.getsockopt(socket.SOL_SOCKET, opt)
                assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                idle, interval, probes = (ours.getsockopt(socket.IPPROTO_TCP, o) for o in (
                    socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT))
                assert idle + interval * probes <= 6
                assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 6000
            for _ in range(2):
                conn, _ = await listener.accept()
                conn.close()


def test_a_peers_text_is_escaped() -> None:
    assert printable("ok: done") == "ok: done"
    assert printable("a\x1b[31mb\x07\u202ec\nd") == r"a\x1b[31mb\x07\u202ec\nd"


def _stuffed_connection() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A connected pair on 127.0.0.1 whose first end has sent all the kernel would take, unread."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    ours.setblocking(False)
    try:
        while True:
            ours.send(b"x" * 65536)
    except BlockingIOError:
        return trio.socket.from_stdlib_socket(ours), trio.socket.from_stdlib_socket(theirs)


async def test_the_end_of_the_stream_waits_while_the_destination_takes_it_and_no_longer() -> None:
    """After SourceDone the source counts silence from the destination's last acknowledgement: a slow
    link still carrying the stream's tail is no lost link; a peer that takes nothing for the link's
    timeout is."""
    ours, theirs = _stuffed_connection()
    with ours, theirs:
        fs = SimpleNamespace(sock=ours, peer="destination x")
        t0 = trio.current_time()
        with trio.fail_after(5), pytest.raises(PeerError, match="took none of the stream's last"):
            await drained(fs, 0.5)
        assert trio.current_time() - t0 >= 0.5

        async def slow_reader() -> None:
            while await theirs.recv(65536):
                await trio.sleep(0.05)  # about 1.3 MB/s: each pause well under the timeout

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            with trio.fail_after(30):
                await drained(fs, 0.5)  # returns once every byte was acknowledged, however long that took
            nursery.cancel_scope.cancel()


async def test_a_control_frame_dripped_a_byte_at_a_time_ends_within_the_frame_timeout() -> None:
    """The same bound in Python, for the handshake and control frames (the wait before a switchover
    has no silence bound of its own: a drip there once held the destination for ever)."""
    a, b = socket.socketpair()
    ours = trio.socket.from_stdlib_socket(a)
    fs = FrameSocket(ours, p.Connection(p.Role.DESTINATION), "source x", frame_timeout=0.3)
    with ours, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip, b, codec.preamble() + hostile(p.Challenge(b"n" * 32)), 0.05)
            t0 = trio.current_time()
            with trio.fail_after(5), pytest.raises(PeerGone, match="did not end it within 0.3 s"):
                await fs.receive()
            assert trio.current_time() - t0 < 1
            nursery.cancel_scope.cancel()
