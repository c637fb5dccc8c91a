"""After the switchover, the streamer: a trio task that reads the request server's notes (a page sent
on request leaves the stream, and the pre-paging policy hears of the fault), asks the policy
(``migrate.prepage``, ``--prepage``) for the next *window* of pages not yet sent (working-set order:
the working set first), and has the native sender stream it, paced by the sender's *pacer*.  Windows
are small enough that the stream follows a request's jump within milliseconds.
"""

from __future__ import annotations

import fcntl
import logging
import struct
import termios
import time
from typing import Callable

import trio

from .. import prepage
from .. import protocol as p
from .._native import ffi, lib
from ..errors import PeerError
from ..progress import Progress
from ..ranges import Remaining
from ..stats import FirstWindow, SourceCounters
from ..wire import FrameSocket
from .sender import Sender, run_array

log = logging.getLogger(__package__)

# Bytes the streamer hands the native sender at a time (whole pages, at least
# one): large enough that the hand-over costs little, small enough that the
# stream follows a request's jump within a few milliseconds.
WINDOW_BYTES = 8 << 20
# Under --max-bandwidth a window is about this long at the cap (and at least
# MIN_WINDOW_BYTES): on a slow link an 8 MiB window takes tens of
# milliseconds, too long for the stream to follow a fault.
WINDOW_S = 0.004
MIN_WINDOW_BYTES = 256 << 10
# Samples of the stream's bytes over time, for the bench's 1 s windows: one
# per interval, bounded.
TIMELINE_INTERVAL = 0.1
MAX_TIMELINE = 10_000
# How often the end of the stream checks what the destination's kernel has acknowledged.
DRAIN_POLL_S = 0.05


class Streamer:
    """Streams what is left after the switchover, a window at a time, jumping after served requests.

    Args:
        sender: the native sender, and its pacer (``--max-bandwidth``), kept across windows and sessions.
        notes: the request server's notes of what it sent.
        policy: the pre-paging policy's name (``--prepage``).
        max_bandwidth: the cap, which sizes the windows.
        link_timeout: how long the destination may take to confirm the whole stream.
        statistics: the source's live counters (progress line and timeline).
    """

    def __init__(self, sender: Sender, notes: object, *, policy: str, max_bandwidth: int, link_timeout: float,
                 statistics: Callable[[], SourceCounters], progress: Progress) -> None:
        self.sender = sender
        self.notes = notes
        self._note_buf = ffi.new("struct wire_run[]", lib.NOTE_RING)
        self.policy_name = policy
        self.policy = prepage.make(policy)
        window = WINDOW_BYTES if not max_bandwidth else max(MIN_WINDOW_BYTES,
                                                              min(WINDOW_BYTES, round(max_bandwidth * WINDOW_S)))
        self.window_pages = max(1, window // sender.page_size)
        self.link_timeout = link_timeout
        self.statistics = statistics
        self.progress = progress
        self.remaining = Remaining([])  # what is left to stream
        self.first = Remaining([])  # working-set order: what goes before the rest
        self.first_cursor = 0
        self.left_the_stream = 0  # pages this stream did not send, as the request server had sent them
        self.first_window: FirstWindow | None = None  # what the stream sent first
        self.timeline: list[tuple[float, int]] = []  # (seconds since the stop, bytes streamed)

    def reset(self, remaining: Remaining, first: Remaining) -> None:
        """What the stream sends from now on; after a lost link what the policy knew of faults is stale."""
        self.remaining, self.first, self.first_cursor, self.left_the_stream = remaining, first, 0, 0
        self.policy = prepage.make(self.policy_name)

    async def sample(self, t0: float) -> None:
        """Samples the stream's bytes every TIMELINE_INTERVAL (``t0``: the stop, time.monotonic()), bounded."""
        while len(self.timeline) < MAX_TIMELINE:
            self.timeline.append((round(time.monotonic() - t0, 3), self.statistics().bytes_streamed))
            await trio.sleep(TIMELINE_INTERVAL)

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
        if runs and self.first_window is None:
            self.first_window = FirstWindow(pages=sum(n for _, n in runs), runs=len(runs),
                                            start=runs[0][0], end=runs[-1][0] + runs[-1][1])
        return runs

    async def stream(self, bulk: FrameSocket) -> None:
        """Streams what is left, a window at a time, from the native sender; then SourceDone.

        Never returns: after SourceDone it waits for the destination's DestDone
        (its caller cancels it then), and raises PeerError if that does not
        come within ``link_timeout`` of the destination's kernel taking the
        stream's last byte.

        **Cancellation**: stops the sender through its eventfd and waits for it.
        """
        t0 = time.monotonic()
        sent_before, total = self.statistics().pages_streamed, self.sender.pages
        while True:
            self._take_notes()
            runs = self._next_window()
            if not runs:
                break
            await self.sender.send_runs(bulk, run_array(runs), len(runs))
            now = self.statistics()
            done = now.pages_streamed + now.pages_requested
            mbps = now.bytes_streamed / max(time.monotonic() - t0, 1e-9) / 1e6
            self.progress.update(f"sent {done}/{total} pages ({100 * min(done, total) / total:.0f}%), "
                                 f"{mbps:.0f} MB/s, {now.requests} requests")
        streamed = self.statistics().pages_streamed - sent_before
        await bulk.send(p.SourceDone(streamed))
        log.info("stream complete: %d pages in %.2f s; %d more had gone on request", streamed,
                 time.monotonic() - t0, self.left_the_stream)
        # Everything is on its way, but a slow link may still carry megabytes of it: silence is
        # counted from when the destination's kernel acknowledged the last byte, not from now.
        await drained(bulk, self.link_timeout)
        await trio.sleep(self.link_timeout)
        raise PeerError(f"{bulk.peer} did not confirm within {self.link_timeout:g} s of receiving the whole "
                        "stream")


async def drained(fs: FrameSocket, link_timeout: float) -> None:
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
