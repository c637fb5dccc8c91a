"""The bench's arithmetic (migrate/benchlib.py): medians, paired ratios, per-run figures, targets.

No process is started: the inputs are metrics shaped like the commands' and the C references' JSON.
"""

import pytest

from migrate import benchlib as bl


def _hop(p50: float, p99: float, total_ms: float, count: int = 10) -> dict:
    return {"count": count, "p50": p50, "p99": p99, "max": p99 * 2, "total_ms": total_ms}


def _dst(**over: object) -> dict:
    m = {
        "pages_total": 262144, "pages_placed": 262144, "verified": True, "downtime_ms": 0.7, "total_s": 1.0,
        "bytes_bulk": 10**9, "stream_gbps": 1.0, "faults": 100, "requests": 80, "pages_placed_urgent": 90,
        "eexist": 3, "zero_pages": 5, "rss_mib": 1050.0, "recoveries": [], "vcpus": 2,
        "vcpu_stall_us": {"count": 120, "p50": 40.0, "p99": 900.0, "max": 5000.0, "total_ms": 60.0},
        "fault_service_us": {"count": 80, "p50": 25.0, "p99": 700.0, "max": 4000.0, "total_ms": 30.0},
        "hops_us": {"fault_to_request": _hop(0.1, 0.3, 0.01), "network": _hop(15, 600, 20),
                    "source_held": _hop(0.6, 2, 0.1), "reply_to_placed": _hop(9, 50, 8)},
    }
    m.update(over)
    return m


def test_median_and_ratio_skip_what_is_missing() -> None:
    assert bl.median([3, None, 1, 2]) == 2
    assert bl.median([1, 2, 3, 4]) == 2.5
    assert bl.median([None]) is None
    assert bl.ratio(3, 2) == 1.5
    assert bl.ratio(None, 2) is None
    assert bl.ratio(3, 0) is None
    assert bl.ratio(3, None) is None


def test_ratios_pair_each_migration_with_the_reference_next_to_it() -> None:
    assert bl.paired_ratios([1.0, 2.0, None], [2.0, 2.0, 1.0]) == [0.5, 1.0, None]
    # Pairing is not the ratio of medians: a slow round of the machine slows both.
    ours, ref = [0.5, 1.0, 1.5], [0.6, 1.2, 1.7]
    assert bl.median(bl.paired_ratios(ours, ref)) == pytest.approx(1.0 / 1.2)
    with pytest.raises(ValueError):
        bl.paired_ratios([1.0], [1.0, 2.0])


def test_spread() -> None:
    assert bl.spread([3, None, 1]) == (1, 3)
    assert bl.spread([None]) is None


def test_summarize_picks_the_figures_and_the_hops() -> None:
    s = bl.summarize(_dst(), {"rss_mib": 1040.0}, 1024, wall_s=5.0)
    assert s["stream_gbps"] == 1.0
    assert s["stall_p50_us"] == 40.0 and s["stall_total_ms"] == 60.0
    assert s["service_p50_us"] == 25.0
    assert set(s["hops_us"]) == set(bl.HOPS)
    assert s["hops_us"]["network"]["p50"] == 15
    assert s["rss_over_guest_mib_src"] == 16.0 and s["rss_over_guest_mib_dst"] == 26.0
    assert s["total_s_per_gib"] == 1.0
    assert s["guest_gbps"] == pytest.approx(1.074, abs=0.001)  # 1 GiB present in 1 s
    assert s["recoveries"] == 0
    assert s["stalled_fraction"] == 0.03  # 60 ms of stalls in 2 vCPUs x 1 s
    assert "postcopy_latency_dist" not in s  # absent from the metrics: left out, never made up


def test_summarize_tolerates_missing_metrics() -> None:
    s = bl.summarize({"stream_gbps": 0.5}, {}, 256)
    assert s["stall_p50_us"] is None and s["hops_us"] == {} and s["rss_over_guest_mib_src"] is None
    assert s["total_s_per_gib"] is None


def test_latency_dist_is_read_when_present() -> None:
    stall = dict(_dst()["vcpu_stall_us"], qemu_dist=[0, 0, 0, 0, 5, 70, 40, 3])
    s = bl.summarize(_dst(vcpu_stall_us=stall), {}, 1024)
    assert s["postcopy_latency_dist"] == [0, 0, 0, 0, 5, 70, 40, 3]
    assert bl.latency_dist({"qemu_dist": "nonsense"}) is None


def test_latency_dist_buckets_double_from_one_microsecond() -> None:
    assert bl.dist_label(0) == "1us-2us"
    assert bl.dist_label(5) == "32us-64us"
    assert bl.dist_label(10) == "1ms-2ms"
    assert bl.dist_label(20) == "1s-2s"
    assert bl.add_dists([[1, 2], None, [0, 1, 5]]) == [1, 3, 5]
    assert bl.add_dists([None, None]) is None


def test_combine_takes_medians_and_worst_cases() -> None:
    runs = [bl.summarize(_dst(stream_gbps=g, rss_mib=r), {"rss_mib": 1030.0}, 1024)
            for g, r in ((1.0, 1050.0), (1.2, 1060.0), (0.8, 1040.0))]
    runs[1]["hops_us"]["network"]["p50"] = 30
    row = bl.combine(runs)
    assert row["runs"] == 3 and row["verified"] is True
    assert row["stream_gbps"] == 1.0
    assert row["hops_us"]["network"]["p50"] == 15
    assert row["worst_rss_over_guest_mib_dst"] == 36.0
    runs[2]["verified"] = False
    assert bl.combine(runs)["verified"] is False
    runs[2]["verified"] = None
    assert bl.combine(runs)["verified"] is None


def test_unaccounted_is_what_the_hops_do_not_cover() -> None:
    row = bl.combine([bl.summarize(_dst(), {}, 1024)])
    assert bl.unaccounted_us(row) == pytest.approx(40.0 - 25.0 - 0.1)
    assert bl.unaccounted_us({"stall_p50_us": None}) is None


def test_fault_floor_medians() -> None:
    runs = [{"fault_loaded_us": {"p50": p, "p99": 10 * p, "max": 100 * p}} for p in (20, 30, 25)]
    assert bl.fault_floor(runs, "fault_loaded_us") == {"p50": 25, "p99": 250, "max": 2500}


def test_pick_leaves_holes_for_failed_rounds() -> None:
    rounds = [{"refs": {"placer_same": {"placer_gbps": 1.0}}}, {"refs": {}}]
    assert bl.pick(rounds, lambda r: r["refs"]["placer_same"]["placer_gbps"]) == [1.0, None]


def _values(**over: float | None) -> dict:
    v = {"fault_p50_ratio": 1.5, "fault_p99_ratio": 3.0, "stall_p50_us": 45.0, "stall_max_us": 5000.0,
         "stream_ratio": 0.95, "idle_stream_gbps": 1.2, "qemu_stream_gbps": 1.05, "qemu_stall_total_ms": 800.0,
         "downtime_ms": 0.7, "rss_over_guest_mib_src": 28.0, "rss_over_guest_mib_dst": 33.0}
    v.update(over)
    return v


def test_targets_are_the_issues() -> None:
    t = {x.name: x for x in bl.targets()}
    assert (t["fault_p50_ratio"].op, t["fault_p50_ratio"].bound) == ("<=", 2)
    assert (t["fault_p99_ratio"].op, t["fault_p99_ratio"].bound) == ("<=", 2)
    assert t["stall_p50_us"].bound == 100 and t["stall_max_us"].bound == 20_000
    assert (t["stream_ratio"].op, t["stream_ratio"].bound) == (">=", 0.9)
    assert t["qemu_stall_total_ms"].bound == 900  # 1/5 of the demo's 4.5 s
    assert t["downtime_ms"].bound == 1
    assert t["rss_over_guest_mib_dst"].bound == 32


def test_evaluate_says_met_not_met_and_in_how_many_runs() -> None:
    out = bl.evaluate(_values(), {"stall_max_us": [5000.0, 25000.0, 4000.0]}, placer_unloaded_gbps=1.5)
    assert out["fault_p50_ratio"]["met"] is True
    assert out["fault_p99_ratio"]["met"] is False
    assert out["stream_ratio"]["met"] is True
    assert out["rss_over_guest_mib_dst"]["met"] is False
    assert out["stall_max_us"]["runs_met"] == [2, 3]
    assert out["idle_stream_gbps"]["met"] is True
    assert out["downtime_ms"]["target"] == "<= 1"


def test_a_bound_is_met_when_equal() -> None:
    out = bl.evaluate(_values(stream_ratio=0.9, fault_p50_ratio=2.0), {}, 1.5)
    assert out["stream_ratio"]["met"] is True and out["fault_p50_ratio"]["met"] is True


def test_unmeasured_targets_are_neither_met_nor_missed() -> None:
    out = bl.evaluate(_values(qemu_stream_gbps=None), {}, 1.5, notes={"qemu_stream_gbps": "no run"})
    assert out["qemu_stream_gbps"]["met"] is None
    assert out["qemu_stream_gbps"]["note"] == "no run"


def test_idle_stream_target_applies_only_when_the_placer_can_do_it() -> None:
    slow = bl.evaluate(_values(idle_stream_gbps=0.8), {}, placer_unloaded_gbps=1.0)
    assert slow["idle_stream_gbps"]["met"] is None
    assert "not applicable" in slow["idle_stream_gbps"]["note"]
    fast = bl.evaluate(_values(idle_stream_gbps=0.8), {}, placer_unloaded_gbps=1.1)
    assert fast["idle_stream_gbps"]["met"] is False
    assert bl.evaluate(_values(), {}, None)["idle_stream_gbps"]["met"] is None
