"""The destination's data plane: its three native loops, each owned by a trio task, and their counters.

- the *placer* places whatever the bulk stream brings (and, in a round,
  replaces or discards the runs the source names);
- the *fault reader* asks the source for every faulting page, duplicates
  included (a duplicate costs one page of bandwidth and comes back as an
  "already present" page, counted as a race the kernel absorbed);
- the *reply placer* places the replies to those requests.

Counters live in one C struct (``dst_plane_t``), each written by one loop
only; ``statistics()`` reads them all at one instant.  Completion: at
switchover the kernel says how many pages are present (``rebase``); from then
on the loops count what they place, and signal the done eventfd when the
pages present reach the guest's size.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, NamedTuple, Sequence

import trio

from .. import protocol as p
from .._native import ffi, lib
from ..loops import CONTROL, run_native
from ..memory import Memory
from ..stats import DestinationCounters
from ..wire import FrameSocket

log = logging.getLogger(__package__)


class Region(NamedTuple):
    """Wire pages [first, first + pages) at address ``base``: the C ``region_t``."""

    base: int
    first: int
    pages: int


class Plane:
    """The native loops' shared view of the guest, their counters, and the tasks that run them.

    Args:
        idle_ms: how long a loop may wait for the peer while pages are owed.
        prefetch: neighbours the fault reader asks for after each faulting page.
    """

    def __init__(self, idle_ms: int, prefetch: int) -> None:
        self.c = ffi.new("dst_plane_t *")  # each counter written by one loop only
        self.idle_ms = idle_ms
        self.prefetch = prefetch

    def attach(self, uffd: int, regions: Sequence[Region], memory: Memory, pagemap_fd: int = -1) -> None:
        """Points the loops at the guest (``regions`` of ``memory``, in page order, covering every page) and its
        userfaultfd, and opens the done eventfd, signalled once every page is present (``wait_done``).
        ``pagemap_fd``: the pagemap of the process the memory belongs to (-1: ours), which may remove memory
        (a VMM's ``UFFD_EVENT_REMOVE``, see ``plane_track_removes`` in native/dataplane.h)."""
        c = self.c
        if not 0 < len(regions) <= len(c.region):
            raise ValueError(f"{len(regions)} regions; the loops take 1 to {len(c.region)}")
        for i, r in enumerate(regions):
            c.region[i] = (r.base, r.first, r.pages)
        c.nregions = len(regions)
        c.uffd, c.pagemap_fd, c.page_shift, c.memory = uffd, pagemap_fd, memory.page_shift, memory
        c.pages = sum(r.pages for r in regions)
        if pagemap_fd >= 0 and lib.plane_track_removes(c) < 0:
            raise MemoryError("no memory for the list of removed ranges")
        c.done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    async def wait_done(self) -> None:
        """Returns once the loops have signalled that every page is present."""
        await trio.lowlevel.wait_readable(self.c.done_fd)

    def detach(self) -> None:
        """Closes the done eventfd and forgets the removes: every page is present, no loop runs."""
        os.close(self.c.done_fd)
        lib.plane_untrack_removes(self.c)

    @property
    def removes(self) -> tuple[int, int]:
        """The VMM's removes so far: (events, pages they named)."""
        return self.c.remove_events, self.c.removed_pages

    def removed_runs(self) -> list[tuple[int, int]]:
        """The ranges the VMM removed, merged, as (page, count) runs in page order."""
        out = ffi.new("struct wire_run[]", lib.PLANE_REMOVES_MAX)
        return [(out[i].start, out[i].count) for i in range(lib.plane_removed_runs(self.c, out, len(out)))]

    @property
    def pages(self) -> int:
        """The guest's size, which the pages present must reach."""
        return self.c.pages

    @property
    def placed_pages(self) -> int:
        """Pages present, by the counters: what the kernel held at switchover, plus placements since.

        Before switchover: every placement (a replaced page counts each time).
        """
        c = self.c
        return c.present_base + c.bulk.pages + c.urgent.pages - c.placed_base

    def rebase(self, present: int) -> None:
        """At switchover: ``present`` pages are there (the kernel says, after every discard); from now on
        completion counts placements, which the kernel never makes twice.  Signals from the rounds
        (every page was present then) say nothing about now: drained."""
        c = self.c
        try:
            os.eventfd_read(c.done_fd)
        except BlockingIOError:
            pass
        c.present_base = present
        c.placed_base = c.bulk.pages + c.urgent.pages

    def statistics(self) -> DestinationCounters:
        """The loops' counters now: what the progress line, the timeline and the final statistics show."""
        c = self.c
        bulk, urgent, faults = c.bulk, c.urgent, c.faults
        return DestinationCounters(
            pages_total=c.pages, pages_placed=self.placed_pages, pages_placed_bulk=bulk.pages,
            pages_placed_urgent=urgent.pages, bytes_bulk=bulk.bytes, bytes_urgent=urgent.bytes,
            bytes_requests=faults.bytes, eexist_bulk=bulk.eexist, eexist_urgent=urgent.eexist,
            zero_pages=bulk.zero_pages + urgent.zero_pages, pages_replaced=bulk.replaced,
            pages_discarded=bulk.discarded, faults=faults.faults, requests=faults.requests,
            pages_requested=faults.pages_requested)

    async def run_placer(self, fs: FrameSocket, replies: bool = False) -> int:
        """Runs the native placer on ``fs`` for the frames its protocol state allows; returns how it ended
        (``CONTROL``: a control frame is next).

        **Cancellation**: stops the placer through its eventfd and waits for it.
        """
        # The context points into the plane and into fs, which outlive the loop.
        placer = ffi.new("dst_placer_t *", {"plane": self.c, "link": fs.link, "rx": fs.conn.rx,
                                            "accept": fs.conn.accepts, "idle_ms": self.idle_ms})
        return await run_native(lib.dst_reply_placer if replies else lib.dst_bulk_placer, placer, peer=fs.peer)

    async def placer(self, bulk: FrameSocket, downtime: Callable[[p.Downtime], None]) -> None:
        """Runs the native placer on the bulk stream until the source says it is complete (SourceDone);
        the source's ``Downtime``, first after the switchover, goes to ``downtime``.

        **Cancellation**: stops the placer through its eventfd and waits for it.
        """
        while await self.run_placer(bulk) == CONTROL:
            event = await bulk.receive()  # the table allows Downtime, then SourceDone; an Error raises
            if not isinstance(event, p.Downtime):
                return
            downtime(event)

    async def fault_reader(self, requests: FrameSocket) -> None:
        """Runs the native fault reader: every batch of faults becomes one request, at once.

        **Cancellation**: stops it through its eventfd and waits for it.
        """
        await run_native(lib.dst_fault_loop, self.c, requests.link, self.idle_ms, 1 + self.prefetch,
                         peer=requests.peer)

    async def reply_placer(self, replies: FrameSocket) -> None:
        """Runs the native reply placer on the replies connection.

        **Cancellation**: stops it through its eventfd and waits for it.
        """
        if await self.run_placer(replies, replies=True) == CONTROL:
            await replies.receive()  # the replies allow no control frame: an Error, or a protocol error, raises

    async def ask_again(self, pages: list[int], requests: FrameSocket) -> None:
        """After a reconnection: asks at once for ``pages``, the ones vCPUs are blocked on (their faults were
        read before the link broke).  No loop runs now: this task may write the fault reader's counters."""
        c = self.c
        # Requests of the lost links will never be answered: owe only what is asked from now on.
        c.urgent.owed_base = max(0, c.faults.pages_requested - c.urgent.answered)
        for i in range(0, len(pages), p.MAX_REQUEST_RUNS):
            batch = pages[i:i + p.MAX_REQUEST_RUNS]
            c.faults.pages_requested += len(batch)
            await requests.send(p.PageRequest(tuple((page, 1) for page in batch), lib.mono_ns()))
