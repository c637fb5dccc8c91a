"""Latency histograms: the Python buckets read the C vCPUs' buckets the same way."""

from migrate._native import lib
from migrate.metrics import BUCKETS, Histogram, bucket_of, bucket_upper_ns


def test_python_and_c_histograms_share_a_layout() -> None:
    assert BUCKETS == lib.STALL_BUCKETS


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
    assert s["count"] == 100
    assert 10 <= s["p50"] <= 11.3
    assert 1000 <= s["p99"] <= 1130
    assert s["max"] == 5000
    assert s["total_ms"] == 6.98
    assert Histogram().summary()["p50"] == 0.0
