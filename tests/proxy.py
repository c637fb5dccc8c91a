"""A TCP proxy on 127.0.0.1 that cuts every connection through it on command.

It counts the bytes flowing from the upstream (the source) to the clients,
so a test can break the links at a chosen point of a migration.
"""

from __future__ import annotations

from typing import Callable

import trio


class CuttingProxy:
    """Forwards connections to ``127.0.0.1:upstream_port``.

    Args:
        upstream_port: where migrate-src listens.
        at_bytes: byte counts (upstream → clients) at which to call ``on_mark``.
        on_mark: called with the mark's index each time a count is crossed.
    """

    def __init__(self, upstream_port: int, at_bytes: list[int], on_mark: Callable[[int], None]) -> None:
        self.upstream_port = upstream_port
        self.marks = sorted(at_bytes)
        self.on_mark = on_mark
        self.down_bytes = 0
        self.cuts = 0
        self._live: list[trio.socket.SocketType] = []
        self._frozen: set[trio.socket.SocketType] = set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket() as listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            task_status.started(listener.getsockname()[1])
            try:
                async with trio.open_nursery() as nursery:
                    while True:
                        client, _ = await listener.accept()
                        nursery.start_soon(self._bridge, client)
            finally:
                self._close_all()

    def cut(self) -> None:
        """Closes every connection through the proxy; new ones are still accepted."""
        self.cuts += 1
        self._close_all()

    def freeze(self) -> None:
        """A silent partition: connections through the proxy stay open but carry nothing more.

        New connections are still accepted and forwarded.
        """
        self.cuts += 1
        self._frozen.update(self._live)

    def _close_all(self) -> None:
        for sock in self._live:
            sock.close()
        self._live.clear()

    async def _bridge(self, client: trio.socket.SocketType) -> None:
        upstream = trio.socket.socket()
        try:
            await upstream.connect(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            upstream.close()
            return
        self._live += [client, upstream]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, False, nursery)
            nursery.start_soon(self._pump, upstream, client, True, nursery)

    async def _pump(self, src: trio.socket.SocketType, dst: trio.socket.SocketType, down: bool,
                    nursery: trio.Nursery) -> None:
        try:
            while True:
                data = await src.recv(65536)
                if down:
                    self.down_bytes += len(data)
                    while self.marks and self.down_bytes >= self.marks[0]:
                        self.marks.pop(0)
                        self.on_mark(len(self.marks))
                if src in self._frozen:
                    await trio.sleep_forever()  # a partition: not even a close gets through
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[await dst.send(view):]
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            nursery.cancel_scope.cancel()
            src.close()
            dst.close()
