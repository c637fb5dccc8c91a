"""The precopy rounds' driver: sends what the planner says, scans, and feeds it what it saw.

The decisions are the planner's (``planner.py``); this module only does the
I/O around them: a round is ``Round(n, pages)``, its frames (pages, or
discards for a discarding round), ``RoundEnd(n)``, and the destination's
``RoundAck(n)``; then one scan of what the guest wrote meanwhile.  Each round
is acknowledged before the next scan, so at most one round's pages are
unconfirmed: after a lost link, that round is sent again whole, with what the
destination's kernel lacks.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import trio

from .. import protocol as p
from ..dirty import Runs
from ..progress import Progress
from ..ranges import Remaining
from ..stats import SourceCounters
from ..wire import FrameSocket
from .modes import Mode
from .planner import Decision, Next, RoundPlanner, Why
from .scans import Scans
from .sender import Sender, run_array

log = logging.getLogger(__package__)


class Rounds:
    """Precopy rounds while the guest runs here, until the planner says to switch over.

    Args:
        mode: the mode, which says what rounds that stop converging lead to.
        max_rounds, switchover_ms: the planner's limits (``--precopy-rounds``, ``--switchover-ms``).
        link_timeout: how long a RoundAck may take.
        scans, sender: write tracking, and the bulk connection's sender.
        statistics: the source's live counters.
    """

    def __init__(self, mode: Mode, *, max_rounds: int, switchover_ms: float, link_timeout: float, scans: Scans,
                 sender: Sender, statistics: Callable[[], SourceCounters], progress: Progress) -> None:
        self.planner = RoundPlanner(sender.pages, max_rounds=max_rounds, switchover_ms=switchover_ms,
                                    when_stuck=mode.when_stuck, page_size=sender.page_size)
        self.link_timeout = link_timeout
        self.scans = scans
        self.sender = sender
        self.statistics = statistics
        self.progress = progress
        self.set: Runs | None = None  # what the round under way sends (None: round 1, every page)
        self.entries: list[dict[str, object]] = []  # each a stats.Round's fields, filled in as scans come

    async def run(self, bulk: FrameSocket, resume: p.Resume | None) -> None:
        """Sends rounds until the switchover; after a reconnection ``resume`` says what the destination lacks.

        **Cancellation**: stops the native sender and waits for it; the round
        under way is sent again whole after a reconnection.
        """
        if not self.scans.started:
            await self.scans.start()  # protects every page: round 1 reads each after that
        again: list[tuple[int, int]] | None = None
        if resume is not None:
            # A replaced page that did not arrive is stale there, not absent: the round goes again whole
            # (a discarding round: its discards again, and what is absent as pages).
            again = list(resume.runs)
            if self.set is not None and not self.planner.discarding:
                again += self.set.as_list()
        while True:
            n = self.planner.round
            sent, seconds, decision = await self._round(bulk, again)
            again = None
            if decision.next is Next.SWITCH_OVER:
                log.info("round %d: %d pages in %.3f s; switching over", n, sent, seconds)
                return
            found = await self.scans.take()
            self.entries[-1]["dirty_pages_found"] = found.pages
            decision = self.planner.scanned(found.pages)
            log.info("round %d: %d pages in %.3f s; %d written meanwhile (%.1f ms to send)", n, sent, seconds,
                     found.pages, decision.estimate_ms)
            if decision.why is Why.NOT_CONVERGING:
                # No use sending them again while the guest runs: they join the final set.
                self.scans.pending = found
                log.info("the rounds do not converge (%d pages written during a round of %d): %s", found.pages,
                         decision.compared_with, "switching over" if decision.next is Next.SWITCH_OVER else
                         "discarding them there now; postcopy brings them after the switchover")
            if decision.next is Next.SWITCH_OVER:
                return  # nothing written since, or not converging in precopy
            self.set = found

    def _frames(self, again: list[tuple[int, int]] | None, discards: Runs | None) -> tuple[Any, int, int]:
        """The round's pages as (C array, runs, pages): again after a reconnection, every page in round 1,
        none in a discarding round, else what the last scan found."""
        if again is not None:
            left = Remaining(again)
            for start, count in (discards.as_list() if discards else []):
                left.discard(start, count)  # dropped again below: no use sending them first
            runs = left.runs()
            return run_array(runs), len(runs), sum(count for _, count in runs)
        if self.set is None:
            return run_array([(0, self.sender.pages)]), 1, self.sender.pages
        if discards is not None:
            return None, 0, 0
        return self.set.array, self.set.n, self.set.pages

    async def _round(self, bulk: FrameSocket, again: list[tuple[int, int]] | None) -> tuple[int, float, Decision]:
        """Sends one round and waits for its RoundAck; returns the pages it sent, its seconds and the
        planner's answer."""
        n = self.planner.round
        discards = self.set if self.planner.discarding else None
        array, count, pages = self._frames(again, discards)
        await bulk.send(p.Round(n, pages + (discards.pages if discards else 0)))
        t0, before = trio.current_time(), self.statistics()
        if count:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._show, n, before.pages_streamed, pages)
                await self.sender.send_runs(bulk, array, count, replace=n > 1)
                nursery.cancel_scope.cancel()
        if discards is not None and discards.n:
            await self.sender.send_discards(bulk, discards.array, discards.n)
        await bulk.send(p.RoundEnd(n))
        # Of round n (the protocol's state checks the number): the destination has all the round's
        # frames once it acknowledges, so silence for a link's timeout means a lost link.
        await bulk.expect(p.RoundAck, within=self.link_timeout)
        seconds, after = trio.current_time() - t0, self.statistics()
        sent, nbytes = after.pages_streamed - before.pages_streamed, after.bytes_streamed - before.bytes_streamed
        entry: dict[str, object] = {"round": n, "pages": sent, "bytes": nbytes, "seconds": round(seconds, 4),
                                    "dirty_pages_found": None}
        if discards is not None:
            entry["discarded"] = after.pages_discarded - before.pages_discarded
        if again is not None:
            entry["resent_after_recovery"] = True
        self.entries.append(entry)
        return sent, seconds, self.planner.acknowledged(pages=sent, nbytes=nbytes, seconds=seconds)

    def stopped(self) -> None:
        """The vCPUs stopped: what they wrote during the last round, if no scan followed it, is the last scan."""
        if self.scans.last is not None and self.entries and self.entries[-1]["dirty_pages_found"] is None:
            self.entries[-1]["dirty_pages_found"] = self.scans.last.pages

    async def _show(self, n: int, pages0: int, pages: int) -> None:
        while True:
            done = self.statistics().pages_streamed - pages0
            self.progress.update(f"round {n}: sent {done}/{pages} pages ({100 * done / max(pages, 1):.0f}%)")
            await trio.sleep(0.1)
