"""After the switchover, the request server: a native loop that reads page requests on the requests
connection and answers each at once on the replies connection, from the stopped guest's memory.  It
leaves a *note* of every run it sent in a ring (``note_ring_t``, one producer, one consumer; a full
ring drops the note, which only costs a duplicate page): the streamer reads them.
"""

from __future__ import annotations

from .. import protocol as p
from .._native import ffi, lib
from ..loops import run_native
from ..wire import FrameSocket
from .sender import Sender


class RequestServer:
    """Serves page requests from the stopped guest's memory, in a native loop, and notes what it sent.

    Args:
        sender: the guest and the link timeout are the stream's.
    """

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.stats = ffi.new("send_stats_t *")  # written by the request server alone
        self.notes = ffi.new("note_ring_t *")  # its producer is the request server, its consumer the streamer

    async def serve(self, requests: FrameSocket, replies: FrameSocket) -> dict[str, float]:
        """Runs the request server (requests in on one connection, replies out on another) until the
        destination says every page is placed; returns its counters.

        DestDone comes after the last request on the same connection, so the
        request server hands it over and each connection keeps one user.

        **Cancellation**: stops the server through its eventfd and waits for it.
        """
        server = ffi.new("src_server_t *", {"replies": self.sender.context(replies, stats=self.stats)[0],
                                            "requests": requests.link, "rx": requests.conn.rx, "notes": self.notes})
        await run_native(lib.src_request_server, server, peer=requests.peer)
        # The loop returns at a control frame: DestDone is the only one the requests allow (an Error raises).
        done = await requests.expect(p.DestDone)
        return done.counters
