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
- ``adaptive``: a small table of fault *zones* (clusters of recent faults).
  Each window goes to the zone with the most recent faults, outward from the
  part of it already swept: forward or backward when most of its recent
  fault-to-fault strides point that way (Leap, ATC'20, prefetches along the
  majority stride), both ways otherwise.  A zone's chunk doubles each time it
  is served without a new fault and halves when one comes (CRIU's page server
  grows and shrinks its chunk the same way), so a region the guest is busy in
  is swept fast while a stray fault costs a few pages.  With no zone left, the
  stream goes on in address order.
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
                runs = remaining.take_after(self.forward, limit)
                if runs:
                    self.forward = runs[-1][0] + runs[-1][1]
            else:
                runs = remaining.take_before(self.backward, limit)
                if runs:
                    self.backward = runs[0][0]
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
    chunk: int = 0  # pages it gets per window
    served: float = 0.0  # windows it got lately, fading like the score
    strides: deque[int] = field(default_factory=lambda: deque(maxlen=Adaptive.STRIDES))

    def reach(self) -> int:
        return max(Adaptive.NEAR, self.hi - self.lo)

    def direction(self) -> int:
        """+1 or -1 when most recent strides point that way (Leap's majority), else 0."""
        if len(self.strides) < 2:
            return 0
        up = sum(1 for d in self.strides if d > 0)
        if 2 * up > len(self.strides) + 1:
            return 1
        if 2 * (len(self.strides) - up) > len(self.strides) + 1:
            return -1
        return 0


class Adaptive(Policy):
    """``adaptive``: sweeps the zones of recent faults, busiest first, in their direction."""

    name = "adaptive"
    ZONES = 8  # zones tracked at once: a few vCPUs' working regions
    NEAR = 256  # pages: a fault this close to a zone (or within its own span) belongs to it
    STRIDES = 8  # fault-to-fault strides kept per zone for the majority vote
    MIN_CHUNK = 16  # pages a zone gets right after a fault
    HALF_LIFE = 4096  # pages streamed over which a zone's score halves
    FLOOR = 0.25  # a zone whose score fades below this is dropped

    def __init__(self) -> None:
        super().__init__()
        self.zones: list[_Zone] = []
        self.faults = 0
        self.zones_made = 0
        self.windows_zoned = 0

    def fault(self, start: int, count: int) -> None:
        self.faults += 1
        self.cursor = start + count  # address order, when it comes to that, goes on from here
        near = [z for z in self.zones if z.lo - z.reach() <= start < z.hi + z.reach()]
        if not near:
            if len(self.zones) == self.ZONES:
                self.zones.remove(min(self.zones, key=lambda z: z.score))
            self.zones.append(_Zone(start, start + count, start, chunk=self.MIN_CHUNK))
            self.zones_made += 1
            return
        z = min(near, key=lambda z: min(abs(start - z.lo), abs(start - z.hi)))
        if start != z.last:
            z.strides.append(start - z.last)
        z.last = start
        z.score += 1
        if not z.lo <= start < z.hi:
            z.chunk = max(self.MIN_CHUNK, z.chunk // 2)  # a fault outside what it swept: we are behind
            # A zone with a direction jumps to the fault: the vCPU went past the pages between
            # (they faulted, or will not be touched soon).  Without one, the pages between may be
            # just as hot: the sweep goes on outward from where it was.
            way = z.direction()
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
        while self.zones:
            z = max(self.zones, key=lambda z: z.score / (1 + z.served))
            runs = self._sweep(z, remaining, min(z.chunk, limit))
            if not runs:
                self.zones.remove(z)  # nothing left around it
                continue
            pages = sum(n for _, n in runs)
            fade = 0.5 ** (pages / self.HALF_LIFE)
            for other in self.zones:
                other.score *= fade
                other.served *= fade
            z.served += 1
            z.chunk = min(limit, 2 * z.chunk)  # no fault came: a bigger bite next time
            self.zones = [o for o in self.zones if o.score >= self.FLOOR]
            self.windows_zoned += 1
            self.cursor = runs[-1][0] + runs[-1][1]
            return runs
        return []

    @staticmethod
    def _sweep(z: _Zone, remaining: Remaining, pages: int) -> Runs:
        way = z.direction()
        runs: Runs = []
        if way >= 0:
            ahead = remaining.take_after(z.hi, pages if way else (pages + 1) // 2)
            if ahead:
                z.hi = ahead[-1][0] + ahead[-1][1]
            runs += ahead
        if way <= 0:
            behind = remaining.take_before(z.lo, pages - sum(n for _, n in runs))
            if behind:
                z.lo = behind[0][0]
            runs = behind + runs
        if not runs and way:  # its way is exhausted: try the other
            z.strides.clear()
            return Adaptive._sweep(z, remaining, pages)
        return runs

    def statistics(self) -> dict[str, object]:
        return {"zones_made": self.zones_made, "windows_zoned": self.windows_zoned}


_POLICIES: dict[str, Callable[[], Policy]] = {p.name: p for p in (AddressOrder, Jump, Bubble, Adaptive)}
POLICIES = list(_POLICIES)


def make(name: str) -> Policy:
    """A fresh policy by its ``--prepage`` name."""
    return _POLICIES[name]()
