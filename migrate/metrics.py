"""Latency histograms, summed up for the statistics a migration reports (migrate/stats.py).

The bucket scheme matches the C one in native/guest.c (8 log-linear
sub-buckets per power of two of nanoseconds, about 12% resolution), so the
vCPUs' own stall histograms and Python-side latencies read the same way.
The vCPUs' stalls also come in QEMU's ``postcopy-latency-dist`` layout, so
they compare with QEMU's figures directly.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable

from ._native import lib
from .stats import LatencySummary, MemoryHeld, StallSummary

BUCKETS: int = lib.HIST_BUCKETS
# QEMU 10.1 query-migrate "postcopy-latency-dist": bucket N counts faults
# resolved in [2^N, 2^(N+1)) µs; 24 buckets, the last one up to ~32 s.
QEMU_DIST_BUCKETS = 24


def bucket_of(ns: int) -> int:
    """Histogram bucket of a duration (``hist_bucket`` in native/stats.c)."""
    if ns < 8:
        return max(ns, 0)
    msb = ns.bit_length() - 1
    return min(msb * 8 + ((ns >> (msb - 3)) & 7), BUCKETS - 1)


def qemu_bucket_of(ns: int) -> int:
    """Bucket of QEMU's postcopy-latency-dist (the C ``qemu_bucket_of``).

    QEMU takes floor(log2(µs)), puts 0 µs into bucket 0 and anything past the
    last bucket into the last one; so bucket 0 holds everything under 2 µs.
    """
    us = max(ns, 0) // 1000
    return min(us.bit_length() - 1, QEMU_DIST_BUCKETS - 1) if us else 0


def bucket_upper_ns(b: int) -> int:
    """Largest duration that falls in bucket ``b``, plus one."""
    if b < 8:
        return b + 1
    msb, sub = divmod(b, 8)
    return (8 + sub + 1) << (msb - 3)


@dataclass
class Histogram:
    """Counts of durations in log-linear buckets; exact count, total and max."""

    count: int = 0
    total_ns: int = 0
    max_ns: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    @classmethod
    def from_c(cls, h: object) -> Histogram:
        """A copy of a native loop's ``hist_t`` (same bucket layout)."""
        return cls(h.count, h.total_ns, h.max_ns, list(h.buckets))  # type: ignore[attr-defined]

    def add(self, ns: int) -> None:
        self.count += 1
        self.total_ns += ns
        self.max_ns = max(self.max_ns, ns)
        self.buckets[bucket_of(ns)] += 1

    def percentile_us(self, q: float) -> float:
        """Upper edge of the bucket holding the q-quantile, in µs (0 when empty)."""
        if not self.count:
            return 0.0
        rank, seen = q * self.count, 0
        for b, n in enumerate(self.buckets):
            seen += n
            if n and seen >= rank:
                return round(min(bucket_upper_ns(b), self.max_ns) / 1000, 1)
        return self.max_ns / 1000

    def summary(self) -> LatencySummary:
        """count, p50, p99, max (µs) and total_ms: what the metrics report."""
        return LatencySummary(count=self.count, p50=self.percentile_us(0.5), p99=self.percentile_us(0.99),
                              max=round(self.max_ns / 1000, 1), total_ms=round(self.total_ns / 1e6, 3))


@dataclass
class StallHistogram(Histogram):
    """The vCPUs' accesses that waited for the migration, plus the slow ones that did not.

    ``qemu_dist`` counts the same stalls as ``buckets`` in QEMU's layout;
    ``slow_other`` counts accesses that were slow but never slept (a
    copy-on-write of a zero page, a preemption): no postcopy cost, so they
    stay out of the stall figures.
    """

    qemu_dist: list[int] = field(default_factory=lambda: [0] * QEMU_DIST_BUCKETS)
    slow_other: int = 0
    slow_other_ns: int = 0

    def add(self, ns: int) -> None:
        super().add(ns)
        self.qemu_dist[qemu_bucket_of(ns)] += 1

    def summary(self) -> StallSummary:
        """The Histogram summary plus ``qemu_dist``, ``slow_other``, ``slow_other_ms`` and ``hist``."""
        hist = tuple((round(bucket_upper_ns(b) / 1000, 3), n) for b, n in enumerate(self.buckets) if n)
        return StallSummary(**vars(super().summary()), qemu_dist=tuple(self.qemu_dist), slow_other=self.slow_other,
                            slow_other_ms=round(self.slow_other_ns / 1e6, 3), hist=hist)


def rss_mib() -> float:
    """Peak resident set size of this process, in MiB.

    From ``VmHWM`` in /proc/self/status, the peak of this program's own
    memory: ``ru_maxrss`` also keeps the peak of the process before its
    ``exec``, i.e. of whatever forked it (a test runner of 800 MiB made a
    source of 100 MiB report 828 MiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _kib_fields(lines: Iterable[str], keys: Iterable[str]) -> dict[str, int]:
    """The ``Key:   N kB`` lines of a /proc file whose key is in ``keys``, as kB (0 where a key is absent)."""
    want = dict.fromkeys(keys, 0)
    for line in lines:
        key, _, value = line.partition(":")
        if key in want:
            want[key] = int(value.split()[0])
    return want


def guest_present_kib(smaps: str, base: int) -> int:
    """kB of the mapping that starts at ``base`` that are present: its ``Rss`` plus its huge pages.

    ``Rss`` leaves out the shared zero page (what ``UFFDIO_ZEROPAGE`` maps into anonymous memory, and
    a read of an untouched anonymous page), so a guest's zero pages that no one wrote count for
    nothing, as in ``VmRSS``; huge pages are only in ``Shared_Hugetlb`` / ``Private_Hugetlb``.  0 when
    no mapping starts at ``base``.
    """
    fields = ("Rss", "Shared_Hugetlb", "Private_Hugetlb")
    kb, inside = 0, False
    for line in smaps.splitlines():
        if line[:1] in tuple("0123456789abcdef"):  # a mapping's line: "start-end perms offset dev inode path"
            inside = int(line.split("-", 1)[0], 16) == base
        elif inside and line.partition(":")[0] in fields:
            kb += int(line.split()[1])
    return kb


def memory_held(base: int, size: int, status: str | None = None, smaps: str | None = None) -> MemoryHeld:
    """What this process holds, and how much of it is beyond its guest (``MemoryHeld``), in MiB.

    Args:
        base, size: the guest's mapping (``size`` is only reported, the mapping is found by ``base``).
        status, smaps: the text of /proc/self/status and /proc/self/smaps; read here when None (tests
            pass their own).
    """
    if status is None:
        status = Path("/proc/self/status").read_text()
    if smaps is None:
        smaps = Path("/proc/self/smaps").read_text()
    kb = _kib_fields(status.splitlines(), ("VmHWM", "RssAnon", "RssFile", "RssShmem", "HugetlbPages"))
    guest = min(guest_present_kib(smaps, base), size // 1024)

    def mib(k: int) -> float:
        return round(k / 1024, 1)

    return MemoryHeld(peak_rss=mib(kb["VmHWM"]), rss_anon=mib(kb["RssAnon"]), rss_file=mib(kb["RssFile"]),
                      rss_shmem=mib(kb["RssShmem"]), hugetlb=mib(kb["HugetlbPages"]), guest_present=mib(guest),
                      beyond_guest=mib(kb["VmHWM"] + kb["HugetlbPages"] - guest))


def write_metrics(metrics: dict[str, object], path: str | None, stdout: IO[str]) -> None:
    """Writes one JSON object to ``path`` (``-`` for stdout); nothing when path is None."""
    if path is None:
        return
    text = json.dumps(metrics, sort_keys=True)
    if path == "-":
        print(text, file=stdout, flush=True)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
