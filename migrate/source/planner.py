"""The precopy rounds and the switchover, planned with no I/O: fed numbers, it answers what comes next.

h11's lesson applied to the source: the decisions that shape a migration
(another round, a round that discards, or the switchover; what the switchover
sends and what postcopy then streams) are plain Python here, with no kernel,
no socket, no trio and no clock, so that they can be read and tested alone.
The drivers (``rounds.py``, ``switchover.py``) send, scan and time, and feed
what they saw in::

    planner = RoundPlanner(pages, max_rounds=10, switchover_ms=5, when_stuck=Next.DISCARD_ROUND,
                           page_size=4096)
    # ...round 1 sent and acknowledged:
    planner.acknowledged(pages=sent, nbytes=sent_bytes, seconds=took)   # Next.SCAN, or Next.SWITCH_OVER
    planner.scanned(found)       # Next.ANOTHER_ROUND, Next.DISCARD_ROUND or Next.SWITCH_OVER
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Precopy rounds stop converging when a round's pages are written again about
# as fast as they are sent (a busy guest rewrites its hot set faster than any
# link sends it): once the pages written during a round reach this share of
# the pages it sent, another round would not shrink them, so the guest
# switches over at once.
NOT_CONVERGING = 0.8


class Next(enum.Enum):
    """What the rounds' driver does next."""

    SCAN = "scan"  # ask the kernel what the guest wrote during the round
    ANOTHER_ROUND = "another round"  # send what the scan found, each page replacing its older copy there
    DISCARD_ROUND = "discard round"  # hybrid, not converging: drop what the scan found there, while the guest runs here
    SWITCH_OVER = "switch over"  # stop the vCPUs


class Why(enum.Enum):
    """Why the planner answered what it did (for the log and the tests)."""

    ACKNOWLEDGED = "the round was acknowledged"
    MAX_ROUNDS = "--precopy-rounds reached"
    LAST_ROUND = "the round was estimated short enough to switch over after it"
    DISCARDED = "the discarding round is over"
    CLEAN = "nothing was written during the round"
    CONVERGING = "the rounds converge"
    NOT_CONVERGING = "the rounds do not converge"


@dataclass(frozen=True)
class Decision:
    """The planner's answer: what comes next, why, and the estimate it was based on (after a scan)."""

    next: Next
    why: Why
    estimate_ms: float | None = None  # what the scan found would take to send, at the rounds' rate
    compared_with: int | None = None  # the round's pages, against which the scan was found (not) converging


class RoundPlanner:
    """Decides, round after round, whether another round, a discarding round or the switchover comes next.

    Round 1 sends every page; each later round what the scan after the one
    before found.  The rounds end when what a scan found would take at most
    ``switchover_ms`` to send at the rate the rounds achieved (that set goes
    as the last round), after ``max_rounds``, when nothing was written, or
    when they stop converging: then ``when_stuck`` says what the mode does
    (precopy switches over at once, hybrid first drops those pages there in
    one discarding round).

    Args:
        guest_pages: the guest's size, which round 1 sends.
        max_rounds: at most this many rounds, round 1 included (``--precopy-rounds``).
        switchover_ms: the switchover threshold (``--switchover-ms``).
        when_stuck: ``Next.SWITCH_OVER`` or ``Next.DISCARD_ROUND``.
        page_size: bytes a page costs on the wire: the estimates are in bytes,
            so that zero pages (a frame header each) do not flatter the rate.
    """

    def __init__(self, guest_pages: int, *, max_rounds: int, switchover_ms: float, when_stuck: Next,
                 page_size: int) -> None:
        assert when_stuck in (Next.SWITCH_OVER, Next.DISCARD_ROUND)
        self.max_rounds = max_rounds
        self.switchover_ms = switchover_ms
        self.when_stuck = when_stuck
        self.page_size = page_size
        self.round = 1  # the round under way
        self.planned = guest_pages  # the pages the round under way is to send (or drop)
        self.discarding = False  # the round under way drops its pages there instead of sending them
        self.last = False  # the round under way was estimated short enough to switch over after it
        self.bytes = 0  # sent by every round so far
        self.seconds = 0.0
        self._sent = 0  # pages the last acknowledged round sent

    @property
    def rate(self) -> float:
        """Bytes per second the rounds achieved, round 1 included."""
        return self.bytes / max(self.seconds, 1e-9)

    def estimate_ms(self, pages: int) -> float:
        """Milliseconds ``pages`` would take to send at the rounds' rate."""
        return pages * self.page_size / max(self.rate, 1.0) * 1000

    def acknowledged(self, *, pages: int, nbytes: int, seconds: float) -> Decision:
        """The round under way was sent (``pages``, ``nbytes``) and acknowledged ``seconds`` after it began.

        Returns ``SCAN`` unless the rounds are over (``SWITCH_OVER``).
        """
        self.bytes += nbytes
        self.seconds += seconds
        self._sent = pages
        if self.round >= self.max_rounds:
            return Decision(Next.SWITCH_OVER, Why.MAX_ROUNDS)
        if self.last:
            return Decision(Next.SWITCH_OVER, Why.LAST_ROUND)
        if self.discarding:
            return Decision(Next.SWITCH_OVER, Why.DISCARDED)
        return Decision(Next.SCAN, Why.ACKNOWLEDGED)

    def scanned(self, found: int) -> Decision:
        """The scan after the acknowledged round found ``found`` pages written during it.

        On ``ANOTHER_ROUND`` or ``DISCARD_ROUND`` the planner moves on to
        that round, whose set is what the scan found.
        """
        estimate = self.estimate_ms(found)
        if found == 0:
            return Decision(Next.SWITCH_OVER, Why.CLEAN, estimate)
        # Against the round's whole set: a round sent again after a lost link sends part of it,
        # while the guest wrote for the whole round and the outage.
        against = max(self._sent, self.planned)
        stuck = found >= NOT_CONVERGING * against
        if stuck and self.when_stuck is Next.SWITCH_OVER:
            return Decision(Next.SWITCH_OVER, Why.NOT_CONVERGING, estimate, against)
        self.discarding = stuck
        self.last = estimate <= self.switchover_ms
        self.round += 1
        self.planned = found
        if stuck:
            return Decision(Next.DISCARD_ROUND, Why.NOT_CONVERGING, estimate, against)
        return Decision(Next.ANOTHER_ROUND, Why.CONVERGING, estimate, against)


class Pages(enum.Enum):
    """The page sets a switchover plan names; the driver holds their runs."""

    EVERY = "every page"
    ABSENT = "what the destination's kernel lacks, as its Resume said"
    LAST_SCAN = "written since the last scan: the scan made as the vCPUs stopped"
    FINAL = "the last scan and, if the rounds stopped converging, the scan before it"
    WORKING_SET = "written in each of the last two short stretches before the stop"


@dataclass(frozen=True)
class SwitchoverPlan:
    """What the switchover sends before the CPU state, and what the postcopy stream then sends.

    ``send`` is False once the destination said its vCPUs run: a switchover is
    never repeated then (two running guests would diverge), and the stream is
    what its kernel lacks.
    """

    send: bool
    discard: Pages | None = None  # dropped there before the CPU state (hybrid)
    copy: tuple[Pages, ...] = ()  # sent with the vCPUs stopped, replacing older copies, before the CPU state (precopy)
    stream: tuple[Pages, ...] = ()  # what postcopy then streams
    first: Pages | None = None  # what the stream sends before the rest (working-set order)
