"""wire.py: socket options (real sockets on 127.0.0.1)."""

from __future__ import annotations

import socket

import trio

from migrate.wire import connect


async def test_connections_leave_buffer_sizes_to_kernel_autotuning() -> None:
    """Fixed SO_RCVBUF/SO_SNDBUF switch autotuning off (and are clamped by net.core.*mem_max):
    our connections keep the kernel's own sizes, and TCP_NODELAY."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as plain:
            ours = await connect("127.0.0.1", port)
            with ours:
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    assert ours.getsockopt(socket.SOL_SOCKET, opt) == plain.getsockopt(socket.SOL_SOCKET, opt)
                assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            for _ in range(2):
                conn, _ = await listener.accept()
                conn.close()
