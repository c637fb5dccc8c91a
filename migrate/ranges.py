"""The source's record of what is left to stream: a sorted list of page ranges.

This is source-side bookkeeping of *sending*, a handful of ranges (a served
request punches at most one hole), never per-page state.
"""

from __future__ import annotations

import bisect


class Remaining:
    """Disjoint, sorted half-open page ranges [start, end) not yet sent."""

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, count in sorted(runs):
            self._add(start, start + count)

    def _add(self, start: int, end: int) -> None:
        if self._ends and start <= self._ends[-1]:
            self._ends[-1] = max(self._ends[-1], end)
        else:
            self._starts.append(start)
            self._ends.append(end)

    @property
    def pages(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def runs(self) -> list[tuple[int, int]]:
        """What is left, as sorted, disjoint (start, count) runs."""
        return [(s, e - s) for s, e in zip(self._starts, self._ends)]

    def take(self, cursor: int, limit: int) -> list[tuple[int, int]]:
        """Removes and returns the runs left within the window of ``limit`` pages that starts at
        the first page left at or after ``cursor``.

        One window is one read of guest memory however many holes served
        requests punched in it.  Wraps around to the lowest range when nothing
        is left after the cursor; ``[]`` when nothing is left at all.
        """
        if not self._starts:
            return []
        i = bisect.bisect_right(self._ends, cursor)
        if i == len(self._starts):
            i = 0
        first = max(self._starts[i], cursor) if self._ends[i] > cursor else self._starts[i]
        end = first + limit
        runs = []
        while i < len(self._starts) and self._starts[i] < end:
            s, e = max(self._starts[i], first), min(self._ends[i], end)
            runs.append((s, e - s))
            i += 1
        for s, n in runs:
            self.discard(s, n)
        return runs

    def take_after(self, cursor: int, limit: int) -> list[tuple[int, int]]:
        """Removes and returns the runs left within ``limit`` pages from the first page left at or
        after ``cursor``; ``[]`` when nothing is left there (no wrapping around)."""
        i = bisect.bisect_right(self._ends, cursor)
        if i == len(self._starts):
            return []
        return self.take(cursor, limit)

    def take_before(self, cursor: int, limit: int) -> list[tuple[int, int]]:
        """Removes and returns the runs left within the ``limit`` pages that end with the last page
        left below ``cursor``, in address order; ``[]`` when nothing is left below it."""
        i = bisect.bisect_left(self._starts, cursor) - 1
        if i < 0:
            return []
        end = min(self._ends[i], cursor)
        first = end - limit
        runs = []
        while i >= 0 and self._ends[i] > first:
            s, e = max(self._starts[i], first), min(self._ends[i], end)
            runs.append((s, e - s))
            i -= 1
        runs.reverse()
        for s, n in runs:
            self.discard(s, n)
        return runs

    def take_pages(self, cursor: int, limit: int) -> list[tuple[int, int]]:
        """Removes and returns up to ``limit`` pages of runs, from the first page left at or after
        ``cursor`` on (wrapping around), however far apart: for a sparse set such as a working set."""
        runs: list[tuple[int, int]] = []
        left = limit
        while left and self._starts:
            i = bisect.bisect_right(self._ends, cursor)
            if i == len(self._starts):
                i = 0
            start = max(self._starts[i], cursor) if self._ends[i] > cursor else self._starts[i]
            n = min(self._ends[i] - start, left)
            runs.append((start, n))
            self.discard(start, n)
            left -= n
            cursor = start + n
        return runs

    def discard(self, start: int, count: int) -> int:
        """Removes [start, start+count) wherever it overlaps what is left; returns the pages removed."""
        end = start + count
        removed = 0
        i = bisect.bisect_right(self._ends, start)
        while i < len(self._starts) and self._starts[i] < end:
            s, e = self._starts[i], self._ends[i]
            removed += min(e, end) - max(s, start)
            pieces = [(a, b) for a, b in ((s, start), (end, e)) if a < b]
            self._starts[i : i + 1] = [a for a, _ in pieces]
            self._ends[i : i + 1] = [b for _, b in pieces]
            i += len(pieces)
        return removed
