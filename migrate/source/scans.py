"""The kernel's scans of what the guest wrote, kept by what each is for: the source's only dirty record.

Each scan is one ``PAGEMAP_SCAN`` walk (``migrate.dirty``): the runs written
since the previous one, in a C array the native sender reads as it is.  The
rounds send them, the switchover discards or copies them, and working-set
order streams some of them first.
"""

from __future__ import annotations

import trio

from ..dirty import DirtyTracker, Runs
from ..memory import Memory

# Working-set order in postcopy: the pages written in each of the last two
# stretches of this length before switchover are streamed first.  A busy
# guest also writes cold pages now and then (hotset: 10% of its accesses are
# uniform): one long stretch would catch many of them, and they would dilute
# the set; a cold page is seldom written in both of two short ones, while a
# hot page almost always is.
WORKING_SET_S = 0.01


class Scans:
    """Write tracking over the guest at ``base`` (``pages`` wire pages of ``memory``), and the scans that matter.

    Nothing is tracked until ``start``; each scan is valid until the one after
    next (``DirtyTracker.take``).
    """

    def __init__(self, base: int, pages: int, memory: Memory) -> None:
        self.base = base
        self.pages = pages
        self.memory = memory
        self.tracker: DirtyTracker | None = None
        self.stretch: Runs | None = None  # postcopy, working-set order: written in the stretch before the last
        self.pending: Runs | None = None  # written during the last round when the rounds stopped converging
        self.last: Runs | None = None  # the scan with the vCPUs stopped: written since the previous scan
        self.final: Runs | None = None  # what the switchover discards or copies: ``last`` and ``pending``

    @property
    def started(self) -> bool:
        return self.tracker is not None

    async def start(self) -> None:
        """Registers the guest for write tracking and write-protects all of it (20 ms per GiB)."""
        self.tracker = await trio.to_thread.run_sync(DirtyTracker, self.base, self.pages, self.memory)

    async def take(self) -> Runs:
        """What the guest wrote since the previous scan (a millisecond or so per GiB, in a worker thread)."""
        assert self.tracker is not None
        return await trio.to_thread.run_sync(self.tracker.take)

    async def take_stretch(self) -> None:
        """Postcopy in working-set order: the scan that ends the stretch before the last."""
        self.stretch = await self.take()

    def take_at_stop(self) -> None:
        """The scan made as the vCPUs stop, in the thread that stopped them (no extra hop inside the
        downtime): ``last``, and ``final`` with what the rounds left ``pending``."""
        tracker = self.tracker
        assert tracker is not None
        self.last = last = tracker.take()
        self.final = tracker.union(self.pending, last) if self.pending is not None else last

    async def working_set(self) -> Runs:
        """Postcopy in working-set order: what the guest wrote in each of the last two stretches."""
        assert self.tracker is not None and self.stretch is not None
        return self.tracker.intersection(self.stretch, await self.take())

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
