"""The switchover's driver: sends what the mode's plan says before the CPU state, then the CPU state.

The plan is the mode's (``modes.py``, a pure function of what the
destination said after a reconnection); this module resolves the page sets it
names into runs and sends them.  What is sent with the vCPUs stopped is in
the downtime: a lone scan goes as the C array the kernel filled, never copied
through Python.  What postcopy then streams is built after the CPU state left.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import protocol as p
from ..dirty import Runs
from ..guest import Guest
from ..image import Image
from ..ranges import Remaining
from ..wire import FrameSocket
from .modes import Mode
from .planner import Pages
from .scans import WORKING_SET_S, Scans
from .sender import Sender, run_array

log = logging.getLogger(__package__)


class Switchover:
    """Sends the switchover (discards or stop-and-copy, then the CPU state), unless the destination has it.

    Keeps the figures the statistics report: pages discarded there or copied
    in the downtime, the milliseconds from the vCPUs' stop to the CPU state,
    and the working set's size.
    """

    def __init__(self, mode: Mode, guest: Guest | Image, scans: Scans, sender: Sender) -> None:
        self.mode = mode
        self.guest = guest
        self.scans = scans
        self.sender = sender
        self.discarded = 0
        self.stop_and_copy_pages = 0
        self.switch_ms = 0.0  # the vCPUs' stop to the CPU state sent, on this host's monotonic clock
        self.working_set_pages: int | None = None

    async def send(self, bulk: FrameSocket, cpu_state: p.CpuState, stopped_at_ns: int, resume: p.Resume | None,
                   rounds: int) -> tuple[Remaining, Remaining]:
        """Sends the switchover after ``rounds`` precopy rounds; ``resume``: what the destination said after
        a reconnection (None the first time); ``stopped_at_ns``: the vCPUs' stop (``time.monotonic_ns()``).

        Returns what the postcopy stream sends, and what it sends first.
        """
        plan = self.mode.switchover(None if resume is None else resume.started, self.working_set_pages is not None)
        absent = list(resume.runs) if resume is not None else []
        if not plan.send:
            return Remaining(self._runs(plan.stream, absent)), Remaining([])
        st = self.sender.stats
        if plan.discard is not None:
            scan = self._resolve(plan.discard, absent)
            assert isinstance(scan, Runs)
            await bulk.send(p.Round(rounds + 1, scan.pages, final=True))
            discards0 = st.discards
            if scan.n:
                await self.sender.send_discards(bulk, scan.array, scan.n)
            self.discarded = st.discards - discards0
        elif plan.copy:
            array, count, pages = self._array(plan.copy, absent)
            await bulk.send(p.Round(rounds + 1, pages, final=True))
            pages0 = st.pages
            if count:
                await self.sender.send_runs(bulk, array, count, replace=True, paced=False)  # inside the downtime
            self.stop_and_copy_pages = st.pages - pages0
        await bulk.send(cpu_state)
        if resume is None:
            self.switch_ms = (time.monotonic_ns() - stopped_at_ns) / 1e6
        log.info("switchover: vCPUs stopped after %d steps; %s", sum(self.guest.steps()),
                 self.mode.describe(self.sender.pages, self.discarded, self.stop_and_copy_pages))
        # What postcopy streams, built after the CPU state left: not inside the downtime.
        remaining = Remaining(self._runs(plan.stream, absent))
        first = Remaining([])
        if plan.first is Pages.WORKING_SET:
            ws = await self.scans.working_set()
            first, self.working_set_pages = Remaining(ws.as_list()), ws.pages
            log.info("working set: %d pages written in each of the last two %.0f ms stretches go first",
                     ws.pages, WORKING_SET_S * 1e3)
        elif plan.first is not None:
            scan = self._resolve(plan.first, absent)
            assert isinstance(scan, Runs)
            first, self.working_set_pages = Remaining(scan.as_list()), scan.pages
        return remaining, first

    def _resolve(self, pages: Pages, absent: list[tuple[int, int]]) -> Runs | list[tuple[int, int]]:
        """The runs a plan's page set names: a scan as the kernel gave it, or a list."""
        if pages is Pages.EVERY:
            return [(0, self.sender.pages)]
        if pages is Pages.ABSENT:
            return absent
        scan = self.scans.last if pages is Pages.LAST_SCAN else self.scans.final
        assert pages in (Pages.LAST_SCAN, Pages.FINAL) and scan is not None
        return scan

    def _runs(self, sets: tuple[Pages, ...], absent: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The union of ``sets``, as a list of runs (a Remaining sorts and merges them)."""
        out: list[tuple[int, int]] = []
        for pages in sets:
            found = self._resolve(pages, absent)
            out += found.as_list() if isinstance(found, Runs) else found
        return out

    def _array(self, sets: tuple[Pages, ...], absent: list[tuple[int, int]]) -> tuple[Any, int, int]:
        """The union of ``sets`` for the native sender: (C array, runs, pages).  A lone scan (nothing else
        to add) goes as its own array: no conversion inside the downtime."""
        found = [self._resolve(pages, absent) for pages in sets]
        scans = [scan for scan in found if isinstance(scan, Runs)]
        if len(scans) == 1 and not any(runs for runs in found if not isinstance(runs, Runs)):
            return scans[0].array, scans[0].n, scans[0].pages
        runs = Remaining(self._runs(sets, absent)).runs()
        return run_array(runs), len(runs), sum(count for _, count in runs)
