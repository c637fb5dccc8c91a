"""The three modes as objects: where ``--mode`` and ``--stream-order`` are read, and nowhere else.

A mode says whether precopy rounds come first, what a round that stops
converging leads to, and what the switchover sends (``switchover``, a pure
function of what the destination said after a reconnection).  Like the
planner it does no I/O: the phases in ``migration.py`` and the drivers ask it.

| mode     | rounds | not converging       | switchover, before the CPU state     | postcopy then streams |
| -------- | ------ | -------------------- | ------------------------------------ | --------------------- |
| postcopy | no     | -                    | nothing                              | every page            |
| hybrid   | yes    | a discarding round   | discards of the last scan            | the final set         |
| precopy  | yes    | switch over at once  | the final set, with the vCPUs stopped | nothing               |
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from .. import protocol as p
from .config import SourceConfig, StreamOrder
from .planner import Next, Pages, SwitchoverPlan


@dataclass(frozen=True)
class Mode(abc.ABC):
    """What every mode has: its name on the wire, and the order the postcopy stream sends pages in.

    Args:
        order: what the postcopy stream sends first.
    """

    order: StreamOrder = StreamOrder.address

    wire: ClassVar[p.Mode]  # the mode the destination learns from GuestInfo
    rounds: ClassVar[bool] = False  # precopy rounds while the guest runs here
    when_stuck: ClassVar[Next] = Next.SWITCH_OVER  # what the rounds lead to when they stop converging

    @property
    def working_set(self) -> bool:
        """Whether the stream sends the pages the guest wrote last before the others."""
        return self.order is StreamOrder.working_set

    @property
    def measures_working_set(self) -> bool:
        """Whether the working set is measured over the last stretches before the stop: postcopy in
        working-set order (after rounds, what the last one left is a working set already)."""
        return self.working_set and not self.rounds

    @property
    def tracks_writes(self) -> bool:
        """Whether this migration asks the kernel what the guest writes (rounds, or working-set order)."""
        return self.rounds or self.working_set

    @abc.abstractmethod
    def switchover(self, started: bool | None, first_known: bool) -> SwitchoverPlan:
        """The switchover to send: ``started`` is None the first time, else what Resume said.

        ``first_known``: the working set was already measured (a switchover
        sent again does not measure it twice).
        """

    @abc.abstractmethod
    def describe(self, pages: int, discarded: int, copied: int) -> str:
        """The log line's end once the switchover is sent."""


class Postcopy(Mode):
    """Switch over at once; every page follows, on demand and by the stream."""

    wire = p.Mode.postcopy

    def switchover(self, started: bool | None, first_known: bool) -> SwitchoverPlan:
        if started:
            return SwitchoverPlan(send=False, stream=(Pages.ABSENT,))
        first = Pages.WORKING_SET if self.working_set and not first_known else None
        return SwitchoverPlan(send=True, stream=(Pages.EVERY,) if started is None else (Pages.ABSENT,), first=first)

    def describe(self, pages: int, discarded: int, copied: int) -> str:
        return f"streaming {pages} pages"


class Hybrid(Mode):
    """Precopy rounds; at the stop the destination drops what was written since the last scan; postcopy brings it."""

    wire = p.Mode.hybrid
    rounds = True
    when_stuck = Next.DISCARD_ROUND

    def switchover(self, started: bool | None, first_known: bool) -> SwitchoverPlan:
        if started:
            return SwitchoverPlan(send=False, stream=(Pages.ABSENT,))
        # What the scan before found when the rounds stopped converging was dropped there by the last
        # round already (and nothing placed since): only the last scan is discarded now.  What the
        # guest wrote during the last round is its working set already: it goes first.
        first = Pages.LAST_SCAN if self.working_set and started is None else None
        return SwitchoverPlan(send=True, discard=Pages.LAST_SCAN, stream=(Pages.FINAL, Pages.ABSENT), first=first)

    def describe(self, pages: int, discarded: int, copied: int) -> str:
        return f"{discarded} pages written since the last scan discarded there"


class Precopy(Mode):
    """Precopy rounds, then the rest with the vCPUs stopped: the destination resumes with every page present."""

    wire = p.Mode.precopy
    rounds = True

    def switchover(self, started: bool | None, first_known: bool) -> SwitchoverPlan:
        if started:
            return SwitchoverPlan(send=False, stream=(Pages.ABSENT,))
        return SwitchoverPlan(send=True, copy=(Pages.FINAL, Pages.ABSENT))

    def describe(self, pages: int, discarded: int, copied: int) -> str:
        return f"{copied} pages copied with the vCPUs stopped"


def choose(cfg: SourceConfig) -> Mode:
    """The mode ``cfg`` asks for: the one place that reads ``cfg.mode`` and ``cfg.stream_order``."""
    kind = next(kind for kind in (Postcopy, Hybrid, Precopy) if kind.wire is cfg.mode)
    return kind(cfg.stream_order)
