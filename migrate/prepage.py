"""Pre-paging policies: what the source's stream sends next, from the faults the destination reports.

The streamer task is the only user.  It tells its policy about every run the
request server sent (``fault``: a vCPU there waited for it), and asks it for
the next window (``next_window``), which the policy takes out of the
streamer's ``Remaining``.  A policy keeps a few numbers about recent faults
and about where the stream is, never anything per page: the ranges left to
send are the streamer's, and the destination keeps no state at all.

- ``none``: address order, whatever faults.
- ``jump``: address order, but on from just after the last requested run
  (QEMU 10's postcopy does the same): a vCPU that faulted there is likely to
  go on there.
- ``bubble``: outward both ways from the last fault, a window forward then a
  window backward (Hines and Gopalan, VEE'09, "bubbling"): spatial locality
  without knowing which way the vCPU goes.
- ``adaptive``: a small table of fault *zones* (clusters of recent faults,
  at most 16, each a few integers).  A zone whose recent fault-to-fault
  strides mostly point one way has a trend (Leap, ATC'20, prefetches along
  the majority stride): each window first sweeps the trending zones from
  their fronts in that direction, busiest first, each in a chunk that starts
  small and doubles every window the trend holds (CRIU's lazy-pages daemon
  grows its chunk the same way while no fault contradicts it); the rest of
  the window goes in address order.  Faults with no trend (a hot set, uniform
  access) are not chased: chasing them spreads the stream over every vCPU's
  region, where address order completes one region after another and the
  vCPUs in it stop faulting (measured, see docs/performance.md).  Several
  scanning vCPUs are each followed at once, where ``jump`` follows only the
  latest fault.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .ranges import Remaining

Runs = list[tuple[int, int]]


class Policy:
    """What the stream sends next.  Subclasses override ``fault`` and ``window``."""

    name = ""

    def __init__(self) -> None:
        self.cursor = 0  # where address order goes on from

    def fault(self, start: int, count: int) -> None:
        """The request server sent ``count`` pages from ``start``: a vCPU waited there."""

    def next_window(self, remaining: Remaining, limit: int) -> Runs:
        """Removes and returns the next runs to stream, ``limit`` pages at most, from ``remaining``.

        ``[]`` only once nothing is left.
        """
        runs = self.window(remaining, limit)
        if not runs:
            runs = self.in_order(remaining, limit)
        return runs

    def window(self, remaining: Remaining, limit: int) -> Runs:
        """The policy's own choice, or ``[]`` to go on in address order."""
        return []

    def in_order(self, remaining: Remaining, limit: int) -> Runs:
        """The next window in address order from the cursor (wrapping around)."""
        runs = remaining.take(self.cursor, limit)
        if runs:
            self.cursor = runs[-1][0] + runs[-1][1]
        return runs

    def statistics(self) -> dict[str, object]:
        return {}


class AddressOrder(Policy):
    """``none``: page 0 upwards; faults change nothing."""

    name = "none"


class Jump(Policy):
    """``jump``: address order, on from just after the last requested run."""

    name = "jump"

    def fault(self, start: int, count: int) -> None:
        self.cursor = start + count


def _take_outward(remaining: Remaining, edge: int, limit: int, *, forward: bool) -> tuple[Runs, int]:
    """Up to ``limit`` pages next to an edge of what was swept, and the edge moved past them.

    Forward, the runs left at or after ``edge``, and the edge moves to just
    after the last; backward, those left below it, and the edge moves to the
    first.  With nothing left that way: ``[]`` and the edge as it was.
    """
    if forward:
        runs = remaining.take_after(edge, limit)
        return runs, (runs[-1][0] + runs[-1][1] if runs else edge)
    runs = remaining.take_before(edge, limit)
    return runs, (runs[0][0] if runs else edge)


class Bubble(Policy):
    """``bubble``: alternately a window forward and a window backward from the last fault.

    The two edges move outward past whatever was sent already; a new fault
    moves both to it.
    """

    name = "bubble"

    def __init__(self) -> None:
        super().__init__()
        self.pivot: int | None = None
        self.forward = self.backward = 0
        self.ahead = True  # the next window goes forward
        self.pivots = 0

    def fault(self, start: int, count: int) -> None:
        self.pivot, self.forward, self.backward, self.ahead = start, start + count, start, True
        self.pivots += 1

    def window(self, remaining: Remaining, limit: int) -> Runs:
        if self.pivot is None:
            return []
        for _ in range(2):
            if self.ahead:
                runs, self.forward = _take_outward(remaining, self.forward, limit, forward=True)
            else:
                runs, self.backward = _take_outward(remaining, self.backward, limit, forward=False)
            self.ahead = not self.ahead
            if runs:
                self.cursor = runs[-1][0] + runs[-1][1]
                return runs
        self.pivot = None  # nothing left either way
        return []

    def statistics(self) -> dict[str, object]:
        return {"pivots": self.pivots}


@dataclass
class _Zone:
    """A cluster of recent faults and the part of it the stream has swept, [lo, hi)."""

    lo: int
    hi: int
    last: int  # page of its latest fault
    score: float = 1.0  # its faults, fading as the stream sends pages
    chunk: int = 0  # pages it gets in its next window
    served: float = 0.0  # windows it got lately, fading like the score: busy zones share fairly
    strides: deque[int] = field(default_factory=lambda: deque(maxlen=Adaptive.STRIDES))

    def direction(self) -> int:
        """+1 or -1 when the recent strides show a trend, else 0.

        A trend is Leap's majority stride: the last two strides equal (a
        vCPU stepping through pages: +1, +1), or the last three all one way
        (a scan that outruns the stream faults at its front, a varying
        distance apart).  Random faults seldom do either: on a uniform guest,
        two strides of one sign made a "trend" out of three faults that
        happened to fall close together, often enough to cost more faults
        than they saved.
        """
        s = self.strides
        if len(s) >= 2 and s[-1] == s[-2]:
            return 1 if s[-1] > 0 else -1
        if len(s) >= 3:
            last = (s[-1], s[-2], s[-3])
            if all(d > 0 for d in last):
                return 1
            if all(d < 0 for d in last):
                return -1
        return 0


class Adaptive(Policy):
    """``adaptive``: zones of recent faults that show a trend first, in its direction; the rest in order."""

    name = "adaptive"
    ZONES = 16  # zones tracked at once: a few vCPUs' working regions, and room for stray faults
    NEAR = 64  # pages: a fault within a zone's swept part, or this close to it, belongs to it
    STRIDES = 8  # fault-to-fault strides kept per zone for the majority vote
    MIN_CHUNK = 16  # pages a zone gets in its first window; doubling each window it is served
    HALF_LIFE = 4096  # pages streamed over which a zone's score halves
    FLOOR = 0.5  # a zone whose score fades below this is dropped

    def __init__(self) -> None:
        super().__init__()
        self.zones: list[_Zone] = []
        self.faults = 0
        self.zones_made = 0
        self.zone_pages = 0

    def fault(self, start: int, count: int) -> None:
        self.faults += 1
        near = [z for z in self.zones if z.lo - self.NEAR <= start < z.hi + self.NEAR]
        if not near:
            if len(self.zones) == self.ZONES:
                self.zones.remove(min(self.zones, key=lambda z: z.score))
            self.zones.append(_Zone(start, start + count, start, chunk=self.MIN_CHUNK))
            self.zones_made += 1
            return
        z = min(near, key=lambda z: min(abs(start - z.lo), abs(start - z.hi)))
        before = z.direction()
        if start != z.last:
            z.strides.append(start - z.last)
        z.last = start
        z.score += 1
        way = z.direction()
        if way != before:
            z.chunk = self.MIN_CHUNK  # a new or turned trend: small bites until it holds
        # Beyond its front the zone jumps to the fault: the vCPU went past the pages between
        # (they faulted, or it will not come back to them soon).
        if way > 0 and start + count > z.hi:
            z.hi = start + count
        elif way < 0 and start < z.lo:
            z.lo = start
        self._merge()

    def _merge(self) -> None:
        """Zones whose swept parts meet become one."""
        self.zones.sort(key=lambda z: z.lo)
        merged: list[_Zone] = []
        for z in self.zones:
            if merged and z.lo <= merged[-1].hi:
                m = merged[-1]
                if z.score > m.score:
                    m.last, m.strides = z.last, z.strides
                m.hi, m.score, m.chunk = max(m.hi, z.hi), m.score + z.score, max(m.chunk, z.chunk)
                m.served += z.served
            else:
                merged.append(z)
        self.zones = merged

    def window(self, remaining: Remaining, limit: int) -> Runs:
        """The trending zones' chunks, busiest first, then address order for the rest of the window.

        A zone without a trend gets nothing: its faults are random as far as
        anyone can tell (a hot set, uniform access), and chasing them spreads
        the stream over every vCPU's region, where address order completes
        one region after another (measured: chasing faults on a uniform or
        hot-set guest costs more faults than address order).
        """
        runs: Runs = []
        left = limit
        tried: set[int] = set()
        while left and (ready := [z for z in self.zones if z.direction() and id(z) not in tried]):
            z = max(ready, key=lambda z: z.score / (1 + z.served))
            tried.add(id(z))
            got = self._sweep(z, remaining, min(z.chunk, left))
            if not got:
                self.zones.remove(z)  # nothing left its way
                continue
            z.served += 1
            z.chunk = min(limit, 2 * z.chunk)  # the trend holds: a bigger bite next time
            runs += got
            left -= sum(n for _, n in got)
        self.zone_pages += limit - left
        if left:
            runs += self.in_order(remaining, left)
        fade = 0.5 ** (limit / self.HALF_LIFE)
        for z in self.zones:
            z.score *= fade
            z.served *= fade
        self.zones = [z for z in self.zones if z.score >= self.FLOOR]
        return runs

    @staticmethod
    def _sweep(z: _Zone, remaining: Remaining, pages: int) -> Runs:
        """Up to ``pages`` pages from the zone's front, in its direction."""
        if z.direction() > 0:
            runs, z.hi = _take_outward(remaining, z.hi, pages, forward=True)
        else:
            runs, z.lo = _take_outward(remaining, z.lo, pages, forward=False)
        return runs

    def statistics(self) -> dict[str, object]:
        return {"zones_made": self.zones_made, "zone_pages": self.zone_pages}


_POLICIES: dict[str, Callable[[], Policy]] = {p.name: p for p in (AddressOrder, Jump, Bubble, Adaptive)}
POLICIES = list(_POLICIES)


def make(name: str) -> Policy:
    """A fresh policy by its ``--prepage`` name."""
    return _POLICIES[name]()
