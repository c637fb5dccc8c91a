"""Latency histograms: the Python buckets read the C vCPUs' buckets the same way."""

from migrate._native import ffi, lib
from migrate.metrics import (BUCKETS, QEMU_DIST_BUCKETS, Histogram, StallHistogram, bucket_of, bucket_upper_ns,
                             qemu_bucket_of)


def test_python_and_c_histograms_share_a_layout() -> None:
    assert BUCKETS == lib.HIST_BUCKETS
    assert ffi.typeof(ffi.new("stall_stats_t *").hist) is ffi.typeof("hist_t")  # the vCPUs' stalls too
    h = ffi.new("hist_t *")
    for ns in [0, 7, 8, 9, 15, 16, 1000, 12_345, 10**6, 10**9, 2**63]:
        before = h.buckets[bucket_of(ns)]
        lib.hist_add(h, ns)  # native/stats.c: the one C definition
        assert h.buckets[bucket_of(ns)] == before + 1
    assert h.count == 11 and h.max_ns == 2**63


def test_buckets_are_monotonic_and_bound_their_values() -> None:
    last = -1
    for ns in [0, 1, 7, 8, 9, 15, 16, 100, 999, 1000, 12_345, 10**6, 10**9, 10**12]:
        b = bucket_of(ns)
        assert b >= last
        assert ns < bucket_upper_ns(b)
        assert bucket_upper_ns(b) <= max(ns * 1.13, ns + 1) + 1  # about 12% resolution
        last = b


def test_percentiles() -> None:
    h = Histogram()
    for us in [10] * 98 + [1000, 5000]:
        h.add(us * 1000)
    s = h.summary()
    assert s.count == 100
    assert 10 <= s.p50 <= 11.3
    assert 1000 <= s.p99 <= 1130
    assert s.max == 5000
    assert s.total_ms == 6.98
    assert Histogram().summary().p50 == 0.0


def test_qemu_layout_doubles_from_one_microsecond() -> None:
    """QEMU's postcopy-latency-dist: bucket N is [2^N, 2^(N+1)) µs, under 2 µs in 0, overflow in the last."""
    assert lib.QEMU_DIST_BUCKETS == QEMU_DIST_BUCKETS == 24
    assert [qemu_bucket_of(us * 1000) for us in (0, 1, 2, 3, 4, 255, 256, 511, 512, 1023, 1024)] == \
        [0, 0, 1, 1, 2, 7, 8, 8, 9, 9, 10]
    assert qemu_bucket_of(999) == 0 and qemu_bucket_of(2**23 * 1000) == 23 and qemu_bucket_of(10**12) == 23


def test_stall_histogram_summary_carries_both_layouts() -> None:
    h = StallHistogram(slow_other=3, slow_other_ns=12_000)
    for us in (1, 30, 30, 700, 5000):
        h.add(us * 1000)
    s = h.summary()
    assert s.count == 5 and sum(s.qemu_dist) == 5
    assert s.qemu_dist[0] == 1 and s.qemu_dist[4] == 2 and s.qemu_dist[9] == 1 and s.qemu_dist[12] == 1
    assert s.slow_other == 3 and s.slow_other_ms == 0.012
    assert sum(n for _, n in s.hist) == 5 and all(a[0] < b[0] for a, b in zip(s.hist, s.hist[1:]))

