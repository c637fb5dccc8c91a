"""A VMM's memory, handed over with its userfaultfd (``migrate-dst --handoff``): the guest the phases serve.

Firecracker (and our stand-in, ``migrate-vmm``) keeps the guest in its own
process and hands its userfaultfd over (``migrate.handoff``).  The phases of
``migration.py`` serve this memory as they serve a guest of our own: the
loops place into the VMM's regions through its userfaultfd, and the kernel's
page tables of the VMM (``/proc/PID/pagemap``) say what is present.  What
differs is that the VMM runs the vCPUs: nothing is resumed, timed or stopped
here, and the VMM proves its own guest.

The wire numbers pages by their offset in the memory file (the regions'
``offset``), which is what ``migrate-src --memory-file`` serves.
"""

from __future__ import annotations

import os
import select

from .. import pagemap
from .. import protocol as p
from ..errors import PeerError, RemoteProtocolError, UsageError
from ..guest import GuestSpec
from ..handoff import Handoff
from ..memory import Memory
from ..metrics import StallHistogram
from .plane import Region


def plane_regions(handoff: Handoff, info: p.GuestInfo) -> list[Region]:
    """The VMM's regions as the loops address them, checked against the guest the source serves: one page
    size, the source's, and the regions' offsets covering its memory file exactly, with no gap.

    Raises:
        RemoteProtocolError: the VMM's memory is not the source's guest (one line naming the first difference).
    """
    page = info.page_size
    out = []
    covered = 0
    for i, r in sorted(enumerate(handoff.regions), key=lambda ir: ir[1].offset):
        if r.page_size != page:
            raise RemoteProtocolError(f"the VMM's region {i} has {r.page_size >> 10} KiB pages; the source serves "
                                      f"{page >> 10} KiB pages")
        if r.offset != covered:
            raise RemoteProtocolError(f"the VMM's regions leave bytes {covered:#x}..{r.offset:#x} of the memory "
                                      "file out" if r.offset > covered else
                                      f"the VMM's region {i} overlaps another in the memory file")
        out.append(Region(r.base, r.offset // page, r.size // page))
        covered += r.size
    if covered != info.pages * page:
        raise RemoteProtocolError(f"the VMM's regions hold {covered >> 20} MiB; the source serves a guest of "
                                  f"{info.pages * page >> 20} MiB")
    return out


class VmmMemory:
    """The memory of a VMM that handed its userfaultfd over, as the destination's phases use a guest.

    Args:
        handoff: what the VMM sent (its userfaultfd, regions, pid, and the connection it keeps open).
        info: the guest the source serves.

    Raises:
        RemoteProtocolError: the VMM's regions are not that guest's memory.
        UsageError: the VMM's page tables cannot be read (``/proc/PID/pagemap`` needs its user, or root).
    """

    def __init__(self, handoff: Handoff, info: p.GuestInfo) -> None:
        self.handoff = handoff
        self.spec = GuestSpec.from_info(info)
        self.regions = plane_regions(handoff, info)
        try:
            self.pagemap_fd = pagemap.open_pagemap(handoff.pid)
        except OSError as exc:
            raise UsageError(f"cannot read the page tables of the VMM (pid {handoff.pid}): {exc.strerror}",
                             hint="run the handler as the VMM's user, or as root") from None

    @property
    def memory(self) -> Memory:
        return self.spec.memory

    @property
    def base(self) -> int:
        """The guest's mapping in this process: none (0).  The VMM's addresses mean nothing here, and one that
        happened to match a mapping of ours would have its pages counted as the guest's (``memory_held``)."""
        return 0

    def addresses(self, start: int, count: int) -> list[tuple[int, int]]:
        """Pages [start, start + count) as (address, pages) stretches, one per region they cross."""
        out = []
        shift = self.spec.memory.page_shift
        for r in self.regions:
            lo, hi = max(start, r.first), min(start + count, r.first + r.pages)
            if lo < hi:
                out.append((r.base + ((lo - r.first) << shift), hi - lo))
        return out

    def absent_runs(self) -> list[tuple[int, int]]:
        """Pages the VMM's page tables do not have yet, as (page, count) runs (pages numbered as on the wire)."""
        shift = self.spec.memory.page_shift
        runs: list[tuple[int, int]] = []
        for r in sorted(self.regions, key=lambda r: r.first):
            runs += pagemap.absent_runs(self.pagemap_fd, r.base, r.pages, shift, r.first)
        return runs

    def present_pages(self) -> int:
        """How many pages the VMM's page tables hold."""
        shift = self.spec.memory.page_shift
        return sum(pagemap.present_pages(self.pagemap_fd, r.base, r.pages, shift) for r in self.regions)

    def gone(self, within_ms: int = 0) -> PeerError | None:
        """The error to end with if the VMM hangs up within ``within_ms`` (it keeps its connection open while
        it lives; a placement may fail on its vanished memory a moment before its files close), else None."""
        poll = select.poll()
        poll.register(self.handoff.conn.fileno(), select.POLLRDHUP)
        if not poll.poll(within_ms):
            return None
        return PeerError(f"the VMM (pid {self.handoff.pid}) hung up: it exited before its memory was whole",
                         hint="see the VMM's own log for why it stopped")

    # The VMM runs the vCPUs: nothing here resumes, times, waits for or stops them.
    def time_stalls(self, on: bool) -> None:
        pass

    def start(self, gated: bool = False) -> None:
        pass

    def import_state(self, states: list[tuple[int, int, int]]) -> None:
        pass

    def release(self) -> None:
        pass

    def request_stop(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def stuck(self, over_ns: int) -> list[tuple[int, float, int]]:
        return []

    def stalls(self) -> StallHistogram:
        return StallHistogram()

    def steps(self) -> list[int]:
        return []

    def live_steps_each(self) -> list[int]:
        return []

    def close(self) -> None:
        """Closes the VMM's page tables and our end of its connection (the userfaultfd is the phases' to close)."""
        os.close(self.pagemap_fd)
        self.handoff.conn.close()
