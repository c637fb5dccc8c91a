"""The bench's arithmetic (bench/benchlib.py): medians, paired ratios, per-run figures, targets.

No process is started: the inputs are metrics shaped like the commands' and the C references' JSON.
"""

import pytest

import benchlib as bl


def _hop(p50: float, p99: float, total_ms: float, count: int = 10) -> dict:
    return {"count": count, "p50": p50, "p99": p99, "max": p99 * 2, "total_ms": total_ms}


def _held(beyond: float, guest: float = 1024.0) -> dict:
    """A side's ``memory_mib`` for an anonymous guest all present, holding ``beyond`` MiB besides it."""
    return {"peak_rss": guest + beyond, "rss_anon": guest + beyond - 8, "rss_file": 8.0, "rss_shmem": 0.0,
            "hugetlb": 0.0, "guest_present": guest, "beyond_guest": beyond}


def _dst(**over: object) -> dict:
    m = {
        "pages_total": 262144, "pages_placed": 262144, "verified": True, "downtime_ms": 0.7, "total_s": 1.0,
        "bytes_bulk": 10**9, "stream_gbps": 1.0, "faults": 100, "requests": 80, "pages_placed_urgent": 90,
        "eexist": 3, "zero_pages": 5, "rss_mib": 1050.0, "memory_mib": _held(26.0), "recoveries": [], "vcpus": 2,
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
    s = bl.summarize(_dst(), {"rss_mib": 1040.0, "memory_mib": _held(16.0)}, 1024, wall_s=5.0)
    assert s["stream_gbps"] == 1.0
    assert s["stall_p50_us"] == 40.0 and s["stall_total_ms"] == 60.0
    assert s["service_p50_us"] == 25.0
    assert set(s["hops_us"]) == set(bl.HOPS)
    assert s["hops_us"]["network"]["p50"] == 15
    assert s["rss_over_guest_mib_src"] == 16.0 and s["rss_over_guest_mib_dst"] == 26.0
    assert s["total_s_per_gib"] == 1.0
    assert s["guest_gbps"] == pytest.approx(1.074, abs=0.001)  # 1 GiB present in 1 s
    huge = bl.summarize(_dst(pages_total=512, page_size=2 << 20), {}, 1024)
    assert huge["guest_gbps"] == s["guest_gbps"]  # 512 pages of 2 MiB: the same GiB
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
    runs = [bl.summarize(_dst(stream_gbps=g, memory_mib=_held(r - 1024)), {"memory_mib": _held(6.0)}, 1024)
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


# -- TLS against plaintext (issue 13) ---------------------------------------------------------------

def test_deltas_pair_each_run_with_its_twin() -> None:
    assert bl.paired_deltas([50.0, 60.0, None], [40.0, 45.0, 30.0]) == [10.0, 15.0, None]
    assert bl.paired_deltas([50.0], [None]) == [None]
    with pytest.raises(ValueError):
        bl.paired_deltas([1.0], [1.0, 2.0])


def test_summarize_keeps_the_negotiated_cipher_and_each_sides_cpu() -> None:
    cpu = {"src": {"user": 1.25, "sys": 0.5}, "dst": {"user": 0.75, "sys": 0.25}}
    s = bl.summarize(_dst(tls="TLSv1.3 TLS_AES_128_GCM_SHA256"), {}, 1024, cpu=cpu)
    assert s["tls"] == "TLSv1.3 TLS_AES_128_GCM_SHA256"
    assert (s["cpu_src_user_s"], s["cpu_src_sys_s"], s["cpu_dst_user_s"], s["cpu_dst_sys_s"]) == (1.25, 0.5, 0.75, 0.25)
    bare = bl.summarize(_dst(), {}, 1024)  # older metrics, no rusage: missing, never zero
    assert bare["tls"] is None and bare["cpu_dst_user_s"] is None
    assert bl.combine([s, s])["cpu_dst_user_s"] == 0.75


def test_negotiated_names_the_one_cipher_or_all_of_them() -> None:
    assert bl.negotiated(["TLSv1.3 A", None, "TLSv1.3 A"]) == "TLSv1.3 A"
    assert bl.negotiated(["TLSv1.3 B", "TLSv1.3 A"]) == "TLSv1.3 A | TLSv1.3 B"
    assert bl.negotiated([None]) is None
    assert bl.combine([bl.summarize(_dst(tls="plaintext"), {}, 1024)])["tls"] == "plaintext"


AES = "TLSv1.3 TLS_AES_128_GCM_SHA256"


def _round(idle: float | None, idle_tls: float | None, busy_p50: float | None, busy_tls_p50: float | None,
           downtimes: tuple[float, float] = (1.0, 1.5), cpu_dst: tuple[float, float] = (0.5, 0.9)) -> dict:
    """One round's run summaries: idle and busy, each with its TLS twin; None leaves the run out."""
    runs = {}
    if idle is not None:
        runs["idle"] = bl.summarize(_dst(stream_gbps=idle, tls="plaintext"), {}, 1024,
                                    cpu={"dst": {"user": cpu_dst[0], "sys": 0.5}})
    if idle_tls is not None:
        runs["idle_tls"] = bl.summarize(_dst(stream_gbps=idle_tls, tls=AES, downtime_ms=downtimes[0]), {}, 1024,
                                        cpu={"dst": {"user": cpu_dst[1], "sys": 0.5}})
    for name, p50, tls, down in (("busy", busy_p50, "plaintext", 0.7), ("busy_tls", busy_tls_p50, AES, downtimes[1])):
        if p50 is not None:
            stall = dict(_dst()["vcpu_stall_us"], p50=p50)
            runs[name] = bl.summarize(_dst(vcpu_stall_us=stall, tls=tls, downtime_ms=down), {}, 1024)
    return {"runs": runs}


def test_tls_targets_are_the_issues() -> None:
    t = {x.name: x for x in bl.tls_targets()}
    assert (t["stream_ratio"].op, t["stream_ratio"].bound) == (">=", 0.7)
    assert (t["stall_p50_delta_us"].op, t["stall_p50_delta_us"].bound) == ("<=", 20)
    assert (t["downtime_ms"].op, t["downtime_ms"].bound) == ("<=", 2)
    assert bl.TLS_TWINS == {"idle_tls": "idle", "busy_tls": "busy"}


def test_tls_summary_pairs_each_tls_run_with_its_twin_in_the_same_round() -> None:
    rounds = [_round(2.0, 1.0, 50.0, 60.0), _round(1.0, 0.8, 40.0, 80.0, cpu_dst=(0.4, 1.0)),
              _round(3.0, 2.4, 45.0, 49.0, downtimes=(2.5, 3.0))]
    out = bl.tls_summary(rounds)
    assert out["cipher"] == AES
    # Per round 0.5, 0.8, 0.8: the median of the ratios, not the ratio of the medians (1.0 / 2.0).
    assert out["stream_ratio_by_round"] == [0.5, 0.8, 0.8]
    assert out["stream_ratio"] == 0.8
    assert out["stall_p50_delta_us_by_round"] == [10.0, 40.0, 4.0]
    assert out["stall_p50_delta_us"] == 10.0
    assert out["downtime_runs_ms"] == [1.0, 1.5, 1.0, 1.5, 2.5, 3.0]  # every TLS run, and only those
    assert out["downtime_ms"] == 1.5
    assert out["runs"] == 6
    pair = out["pairs"]["idle_tls"]
    assert pair["stream_gbps"]["plaintext"] == 2.0 and pair["stream_gbps"]["tls"] == 1.0
    assert pair["cpu_dst_user_s"]["delta_by_round"] == [0.4, 0.6, 0.4]
    assert pair["cpu_dst_user_s"]["delta"] == 0.4
    assert pair["cpu_src_user_s"]["delta"] is None  # not measured: no figure, never zero
    assert out["pairs"]["busy_tls"]["stall_p50_us"]["delta"] == 10.0
    t = out["targets"]
    assert t["stream_ratio"]["met"] is True and t["stream_ratio"]["runs_met"] == [2, 3]
    assert t["stall_p50_delta_us"]["met"] is True and t["stall_p50_delta_us"]["runs_met"] == [2, 3]
    assert t["downtime_ms"]["met"] is True and t["downtime_ms"]["runs_met"] == [4, 6]
    assert t["downtime_ms"]["target"] == "<= 2"


def test_tls_targets_missed_and_bounds_met_when_equal() -> None:
    out = bl.tls_summary([_round(2.0, 1.2, 50.0, 75.0, downtimes=(2.5, 2.5))])
    assert out["stream_ratio"] == 0.6 and out["targets"]["stream_ratio"]["met"] is False
    assert out["targets"]["stall_p50_delta_us"]["met"] is False
    assert out["targets"]["downtime_ms"]["met"] is False
    equal = bl.tls_summary([_round(2.0, 1.4, 50.0, 70.0, downtimes=(2.0, 2.0))])
    assert all(t["met"] is True for t in equal["targets"].values())


def test_tls_summary_skips_rounds_that_lack_a_twin() -> None:
    rounds = [_round(2.0, None, 50.0, 60.0), _round(2.0, 1.6, None, 60.0), _round(2.0, 1.0, 50.0, 55.0)]
    out = bl.tls_summary(rounds, notes={"stream_ratio": "--quick: 256 MiB guests"})
    assert out["stream_ratio_by_round"] == [None, 0.8, 0.5]
    assert out["stall_p50_delta_us_by_round"] == [10.0, None, 5.0]
    assert out["stream_ratio"] == pytest.approx(0.65)
    assert out["targets"]["stream_ratio"]["runs_met"] == [1, 2]
    assert out["targets"]["stream_ratio"]["note"] == "--quick: 256 MiB guests"


def test_tls_summary_without_tls_runs_measures_nothing() -> None:
    out = bl.tls_summary([_round(2.0, None, 50.0, None)])
    assert out["cipher"] is None and out["runs"] == 0 and out["pairs"] == {}
    assert all(t["met"] is None for t in out["targets"].values())


# -- scripts/bench's rows, references and headline figures (bench/refbench.py runs them) ------------

LOADS = {"idle": "unloaded", "idle_tls": "unloaded", "busy": "same", "busy_tls": "same", "qemu": "same"}


def _refs(placer_unloaded: float, placer_same: float, floor_p50: float, floor_p99: float) -> dict:
    floor = {"fault_idle_us": {"p50": 10.0, "p99": 20.0, "max": 90.0},
             "fault_loaded_us": {"p50": floor_p50, "p99": floor_p99, "max": 500.0}}
    return {"placer_unloaded": {"placer_gbps": placer_unloaded}, "placer_same": {"placer_gbps": placer_same},
            "floor_same": floor, "floor_unloaded": floor}


def _bench_round(busy_gbps: float, placer_same: float, busy_p50: float, floor_p50: float,
                 downtime: float = 0.5, tls: bool = True) -> dict:
    stall = dict(_dst()["vcpu_stall_us"], p50=busy_p50)
    runs = {"idle": bl.summarize(_dst(stream_gbps=1.5, downtime_ms=downtime), {}, 1024),
            "busy": bl.summarize(_dst(stream_gbps=busy_gbps, vcpu_stall_us=stall, downtime_ms=downtime), {}, 1024),
            "qemu": bl.summarize(_dst(stream_gbps=1.1, downtime_ms=downtime), {}, 1024)}
    if tls:
        runs["idle_tls"] = bl.summarize(_dst(stream_gbps=1.2, downtime_ms=9.0, tls=AES), {}, 1024)
        runs["busy_tls"] = bl.summarize(_dst(vcpu_stall_us=stall, downtime_ms=9.0, tls=AES), {}, 1024)
    return {"refs": _refs(2.0, placer_same, floor_p50, 4 * floor_p50), "runs": runs}


def test_scenario_rows_pair_each_run_with_the_reference_of_its_load() -> None:
    rounds = [_bench_round(1.0, 2.0, 40.0, 20.0), _bench_round(0.9, 1.0, 60.0, 20.0),
              _bench_round(1.2, 1.5, 50.0, 25.0)]
    rows = bl.scenario_rows(rounds, 1024, LOADS)
    assert list(rows) == ["idle/1024", "idle_tls/1024", "busy/1024", "busy_tls/1024", "qemu/1024"]  # loads' order
    busy = rows["busy/1024"]
    assert busy["load"] == "same" and busy["runs"] == 3
    assert busy["stream_ratio_by_round"] == pytest.approx([0.5, 0.9, 0.8])  # over the same-load placer of its round
    assert busy["stream_ratio"] == pytest.approx(0.8)
    assert busy["fault_p50_ratio_by_round"] == [2.0, 3.0, 2.0]
    assert busy["fault_p99_ratio"] == 11.25  # stall p99 900 over floor p99 80, 80, 100: 11.25, 11.25, 9
    assert rows["idle/1024"]["stream_ratio_by_round"] == [0.75, 0.75, 0.75]  # over the unloaded placer (2.0)
    assert busy["unaccounted_p50_us"] == pytest.approx(50.0 - 25.0 - 0.1)
    assert bl.scenario_rows([{"refs": {}, "runs": {}}], 256, LOADS) == {}


def test_ref_summary_medians_over_the_rounds_a_reference_ran_in() -> None:
    rounds = [_bench_round(1.0, 2.0, 40.0, 20.0), _bench_round(1.0, 1.0, 40.0, 30.0), {"refs": {}, "runs": {}}]
    refs = bl.ref_summary(rounds)
    assert refs["placer_same"] == {"gbps": 1.5, "by_round": [2.0, 1.0, None]}
    assert refs["floor_same"]["with_stream_us"]["p50"] == 25.0
    assert refs["floor_same"]["link_idle_us"]["p50"] == 10.0
    assert refs["floor_same"]["by_round_p99_us"] == [80.0, 120.0]  # the rounds it ran in only
    assert bl.ref_summary([{"refs": {}, "runs": {}}]) == {}


def _computed(quick: bool = False, tls: bool = True) -> dict:
    head = [_bench_round(1.0, 2.0, 40.0, 20.0, downtime=0.5, tls=tls),
            _bench_round(0.9, 1.0, 60.0, 20.0, downtime=1.5, tls=tls)]
    small_idle = bl.summarize(_dst(total_s=0.2, memory_mib=_held(14.0, 256)), {}, 256)
    small = [{"refs": _refs(2.2, 2.0, 20.0, 80.0), "runs": {"idle": small_idle}}]
    results: dict = {"refs": {}, "tls": {"aes_128_gcm_one_core": {"encrypt_gbps": 3.0}}}
    bl.compute(results, {1024: head, 256: small}, 1024, quick, LOADS, 2)
    return results


def test_compute_the_headline_figures_and_targets() -> None:
    r = _computed()
    assert set(r["scenarios"]) == {"idle/1024", "idle_tls/1024", "busy/1024", "busy_tls/1024", "qemu/1024",
                                   "idle/256"}
    assert r["floors"]["placer_same_load_gbps"] == 1.5 and r["floors"]["spinners"] == 2
    assert r["floors"]["fault_same_load_us"]["p50"] == 20.0
    # Downtime: every plaintext run at the headline size, never the TLS twins' (9 ms) nor other sizes'.
    assert r["downtime_runs_ms"] == [0.5, 0.5, 0.5, 1.5, 1.5, 1.5]
    assert r["downtime_ms"] == 1.0
    assert r["downtime_basis"] == "median of 6 runs, every plaintext scenario at 1024 MiB"
    assert r["stream_ratio"] == r["scenarios"]["busy/1024"]["stream_ratio"] == pytest.approx(0.7)
    assert r["qemu_load"]["stream_gbps"] == 1.1 and r["qemu_load"]["runs"] == 2
    assert r["rss_over_guest_mib"] == {"src": None, "dst": 26.0}  # the worst run of every size (256 MiB: 14)
    t = r["targets"]
    assert t["stream_ratio"]["met"] is False and t["stream_ratio"]["runs_met"] == [1, 2]
    assert t["downtime_ms"]["met"] is True and t["downtime_ms"]["note"] == r["downtime_basis"]
    assert t["idle_stream_gbps"]["met"] is True  # the unloaded placer reached 2.0 GB/s
    assert "note" not in t["stall_p50_us"]


def test_compute_adds_tls_to_what_the_set_up_measured_and_the_scaling() -> None:
    r = _computed()
    assert r["tls"]["aes_128_gcm_one_core"] == {"encrypt_gbps": 3.0}  # kept
    assert r["tls"]["guest_mib"] == 1024 and r["tls"]["stream_ratio"] == pytest.approx(0.8)
    assert r["tls"]["rss_over_guest_mib"] == {"src": None, "dst": 26.0}
    sc = r["scaling"]
    assert sc["sizes_mib"] == [256, 1024]
    # idle: 1 s per GiB at 1024 MiB against 0.8 at 256 MiB; the placer 2.2 -> 2.0 GB/s.
    assert sc["idle_s_per_gib_growth"] == pytest.approx(0.25)
    assert sc["placer_s_per_gib_growth"] == pytest.approx(0.1)
    assert sc["beyond_placer"] == pytest.approx(1.25 / 1.1 - 1)


def test_compute_quick_notes_the_size_and_without_tls_leaves_it_out() -> None:
    r = _computed(quick=True, tls=False)
    assert r["targets"]["stall_p50_us"]["note"] == "--quick: 1024 MiB guests"
    assert "stream_ratio" not in r["tls"]
    assert bl.scaling({}, {}, [1024]) is None


def test_what_the_commands_and_tools_print_is_parsed() -> None:
    assert bl.listening_address('{"listening": "127.0.0.1:4242"}\n') == "127.0.0.1:4242"
    assert bl.listening_address("not json") is None
    assert bl.listening_address('["listening"]') is None
    assert bl.listening_address('{"progress": 1}') is None
    speed = "+H:16384\n+F:22:aes-128-gcm:3456789012.34\n"
    assert bl.openssl_speed_gbps(speed) == 3.46
    assert bl.openssl_speed_gbps("+H:16384\n") is None


# -- the report scripts/bench prints (bench/refreport.py) ------------------------------------------

def test_report_figures_and_tables() -> None:
    import refreport

    assert refreport.fmt(None) == "-" and refreport.fmt(True) == "yes" and refreport.fmt(False) == "NO"
    assert refreport.fmt(1.23456) == "1.23" and refreport.fmt(1.25, 1) == "1.2" and refreport.fmt(3) == "3"
    assert refreport.fmt(123456.0) == "1.23e+05"
    assert refreport.table([["a", "12345"], ["bb", "1"]], ["x", "y"]) == ["   x      y", "   a  12345", "  bb      1"]
    assert refreport.table([], ["x"]) == ["  "]


def test_report_says_which_targets_were_met() -> None:
    import refreport

    t = {"value": 0.7, "target": ">= 0.9", "met": False, "what": "busy: stream", "runs_met": [1, 2]}
    line = refreport.target_line("stream_ratio", t)
    assert line.split() == ["stream_ratio", "0.70", ">=", "0.9", "NOT", "MET", "1/2", "runs", "busy:", "stream"]
    assert refreport.target_line("x", dict(t, met=None, note="n"), [0.5, None]).endswith("busy: stream [0.50 -]  (n)")


def test_report_has_every_section_of_a_run() -> None:
    import refreport

    r = _computed()
    r.update(vcpus=2, tcp_gbps=3.5, warmup={"memory": {"mib": 2048, "touch_gbps": 0.5}, "migration": "busy"},
             rounds={"1024": [{"errors": {"hotset": "boom"}}]})
    text = "\n".join(refreport.report(r))
    for heading in ("warm-up: touched 2048 MiB at 0.50 GB/s (cold: first touch); one untimed migration (busy)",
                    "loopback TCP: 3.50 GB/s", "C references, medians over rounds (same load = 2 busy",
                    "uffd-migrate, medians over rounds", "urgent path, hop by hop",
                    "(no postcopy-latency-dist", "downtime: median 1.00 ms, 0.50-1.50", "QEMU's load (1024 MiB)",
                    "targets (issue 9):", "TLS against plaintext (1024 MiB", "targets (issue 13, TLS):",
                    "scaling: idle s/GiB grows 0.25", "hotset at 1024 MiB, round 1 failed: boom"):
        assert heading in text
    assert refreport.report({}) == []
    assert refreport.tls({"error": "no openssl\nmore"}) == ["\nTLS: not measured: no openssl"]


# -- scripts/bench's plan and steps (bench/refbench.py) --------------------------------------------

def test_bench_plan_rounds_and_steps() -> None:
    import refbench

    assert refbench.make_plan(True, None, True, True) == [(256, ("idle", "busy", "qemu", "idle_tls", "busy_tls"), 2)]
    full = refbench.make_plan(False, 5, True, False)
    assert full == [(1024, ("idle", "busy", "qemu", "hotset"), 5), (256, ("idle", "busy", "hotset"), 1),
                    (4096, ("idle", "busy", "hotset"), 1)]
    assert refbench.make_plan(False, None, False, False)[0][2] == 3
    assert len(refbench.make_plan(False, 1, False, False)) == 1  # --no-scaling: the headline size only
    # A round runs only the references its scenarios are compared with, each before its migrations.
    assert refbench.steps(("idle", "idle_tls")) == [("ref", "placer_unloaded"), ("mig", "idle"), ("mig", "idle_tls"),
                                                    ("ref", "floor_unloaded")]
    assert [n for _, n in refbench.steps(("busy", "qemu"))] == ["placer_same", "busy", "floor_same", "qemu"]


def test_bench_source_arguments() -> None:
    import argparse

    import refbench

    args = argparse.Namespace(idle_rate=7, run_before=1.5)
    tls = {"src": ["--tls-cert", "c"], "dst": ["--tls-cert", "d"]}
    idle = refbench.source_args("idle_tls", 256, args, tls)
    assert idle[:8] == ["--guest-mib", "256", "--vcpus", "2", "--workload", "readmostly", "--seed", "1"]
    assert idle[-6:] == ["--rate", "7", "--zero-fraction", "0", "--tls-cert", "c"]
    assert refbench.source_args("busy", 256, args, None)[-2:] == ["--run-before", "1.5"]
    results = {"rounds": {"256": [{"raw": {"busy": {"dst": {"placed_timeline": [[0.1, 5, 1]]}}, "idle": {"dst": {}}}}],
                          "1024": []}}
    assert refbench.first_round_timelines(results) == {"busy/256": [[0.1, 5, 1]]}


# -- scripts/bench-modes (bench/modebench.py runs it) ----------------------------------------------

def _mode_src(migration_s: float = 2.0) -> dict:
    return {"migration_s": migration_s, "precopy_s": 1.5, "bytes_sent_total": 2**30,
            "guest_steps_per_s": {"ratio": 0.9},
            "rounds": [{"dirty_pages_found": 900}, {"dirty_pages_found": 40}],
            "switchover": {"dirty_pages": 40, "working_set_pages": 300, "stopped_to_cpu_state_ms": 0.2}}


def _mode_dst(faults: int, stall_ms: float, downtime_ms: float = 0.5) -> dict:
    return {"downtime_ms": downtime_ms, "faults": faults, "vcpu_stall_us": {"total_ms": stall_ms}, "verified": True}


def test_mode_figures_from_both_sides() -> None:
    f = bl.mode_figures(_mode_src(), _mode_dst(12, 3.5))
    assert f["total_s"] == 2.0 and f["precopy_s"] == 1.5 and f["bytes_sent"] == 2**30
    assert f["rounds"] == 2 and f["round_dirty"] == [900, 40] and f["dirty_at_switchover"] == 40
    assert f["faults"] == 12 and f["stall_ms"] == 3.5 and f["verified"] is True
    assert f["working_set_pages"] == 300 and f["source_switch_ms"] == 0.2 and f["progress"] == 0.9


def test_repeated_runs_rotate_and_take_medians() -> None:
    assert bl.rotated([1, 2, 3], 0) == [1, 2, 3]
    assert bl.rotated([1, 2, 3], 4) == [2, 3, 1]
    runs = [dict(bl.mode_figures(_mode_src(s), _mode_dst(f, st))) for f, st, s in
            ((100, 10.0, 1.0), (300, 30.0, 3.0), (200, 50.0, 2.0))]
    row = bl.repeated_row(runs, "busy hotset", "hybrid")
    assert row["runs"] == 3 and row["faults"] == 200 and row["stall_ms"] == 30.0 and row["total_s"] == 2.0
    assert row["each"] == "100, 300, 200" and row["ws"] == 300


def _modes(q_hybrid_faults: int, q_hybrid_stall: float, pre_downtime: float) -> list[dict]:
    runs = {("qemu", "postcopy"): _mode_dst(1000, 500.0, 0.8), ("qemu", "hybrid"): _mode_dst(q_hybrid_faults,
                                                                                              q_hybrid_stall, 0.9),
            ("qemu", "precopy"): _mode_dst(0, 0.0, pre_downtime)}
    return [dict(bl.mode_figures(_mode_src(), d), load=load, mode=mode) for (load, mode), d in runs.items()]


def _mode_rows(addr_faults: float, ws_faults: float, hybrid_stall: float) -> dict:
    def row(faults: float, stall: float) -> dict:
        return {"faults": faults, "stall_ms": stall}
    return {("busy hotset", "postcopy, address"): row(addr_faults, 100.0),
            ("busy hotset", "postcopy, working-set"): row(ws_faults, 80.0),
            ("busy hotset", "hybrid"): row(10, hybrid_stall)}


def test_mode_targets_met_and_missed_at_their_bounds() -> None:
    met = bl.mode_targets(_modes(100, 50.0, 39.9), _mode_rows(400, 200, 100.0))
    assert [m for _, _, m in met] == [True] * 6
    assert met[0][1] == "100 vs 1000" and met[1][1] == "50.0 vs 500.0 ms"
    assert met[5][1].startswith("39.9 ms, total 2.00 s (QEMU precopy: total 3.5-3.8 s")
    missed = bl.mode_targets(_modes(101, 50.1, 40.0), _mode_rows(400, 201, 100.1))
    assert [m for _, _, m in missed] == [False, False, True, False, False, False]


def test_modes_report_is_markdown() -> None:
    import modebench

    assert modebench.fmt(None) == "\u2013" and modebench.fmt(2.0, 1) == "2.0" and modebench.fmt(False) == "NO"
    assert modebench.fmt(123456.0) == "123456.00"  # never in 3 significant digits, unlike scripts/bench
    assert modebench.table([{"a": 1.5}, {}], [("A", "a", 1), ("B", "b", 0)]).splitlines() == [
        "| A | B |", "|---|---|", "| 1.5 | \u2013 |", "| \u2013 | \u2013 |"]
    order = []
    for load, _, variant, _ in modebench.REPEATED:
        order.append(dict(bl.mode_figures(_mode_src(), _mode_dst(10, 5.0)), load=load, variant=variant))
    lines = modebench.report({"mib": 64, "git": "abc", "modes": _modes(1, 1.0, 1.0), "order": order}, 1)
    assert lines[0] == "### 64 MiB, 2 vCPUs, commit abc\n"
    assert lines[1].splitlines()[2].startswith("| qemu | postcopy | 2.00 | 1.50 | 0.8 | 1024 | 1000 |")
    assert "\nRepeated 1 times, interleaved; medians:\n" in lines
    assert lines[-1].startswith("| qemu: precopy downtime well under QEMU's 160 ms | 1.0 ms") and lines[-1].endswith(
        "| yes |")


def test_launcher_runs_the_bench_under_the_python_it_is_given() -> None:
    import launcher

    assert launcher.interpreter(["--quick"]) == launcher.VENV / "bin" / "python"
    assert str(launcher.interpreter(["--quick", "--python", "/v/bin/python"])) == "/v/bin/python"
    assert str(launcher.interpreter(["--python=/w/bin/python"])) == "/w/bin/python"


# -- memory kinds (issue 22): what a process holds beyond its guest, and the memory section ---------

GUEST_BASE = 0x7F0000000000


def _status(hwm_mib: float, anon: float, file: float = 9.0, shmem: float = 0.0, hugetlb: float = 0.0) -> str:
    """/proc/self/status as the kernel writes it, for the fields memory_held reads (MiB in, kB out)."""
    kb = {k: int(v * 1024) for k, v in (("VmHWM", hwm_mib), ("RssAnon", anon), ("RssFile", file),
                                         ("RssShmem", shmem), ("HugetlbPages", hugetlb))}
    return ("Name:\tmigrate-dst\nVmPeak:\t 9999999 kB\n"
            f"VmHWM:\t{kb['VmHWM']:>8} kB\nVmRSS:\t{kb['RssAnon'] + kb['RssFile'] + kb['RssShmem']:>8} kB\n"
            f"RssAnon:\t{kb['RssAnon']:>8} kB\nRssFile:\t{kb['RssFile']:>8} kB\nRssShmem:\t{kb['RssShmem']:>8} kB\n"
            f"VmData:\t 1200000 kB\nHugetlbPages:\t{kb['HugetlbPages']:>8} kB\nThreads:\t8\n")


def _smaps(guest_rss_mib: float, guest_huge_mib: float = 0.0, shared: bool = False) -> str:
    """/proc/self/smaps: the interpreter's heap, the 1 GiB guest at GUEST_BASE, a library; each with its Rss."""
    def mapping(start: int, end: int, perms: str, path: str, rss_kb: int, huge_kb: int = 0) -> str:
        return (f"{start:x}-{end:x} {perms} 00000000 00:01 4242    {path}\n"
                f"Size:            {(end - start) >> 10} kB\nKernelPageSize:        4 kB\nRss:      {rss_kb:>10} kB\n"
                f"Pss:      {rss_kb:>10} kB\nPss_Shmem:      {rss_kb if shared else 0} kB\n"
                f"Private_Dirty:  {rss_kb} kB\nAnonHugePages:         0 kB\nShared_Hugetlb:  {huge_kb:>8} kB\n"
                f"Private_Hugetlb:        0 kB\nSwap:                  0 kB\nLocked:                0 kB\n"
                f"THPeligible:    0\nVmFlags: rd wr mr mw me {'sh ' if shared else ''}ac\n")
    return (mapping(0x55550000, 0x55560000 + (30 << 20), "rw-p", "[heap]", 30 << 10)
            + mapping(GUEST_BASE, GUEST_BASE + (1 << 30), "rw-s" if shared else "rw-p",
                      "/memfd:uffd-migrate guest (deleted)" if shared else "", int(guest_rss_mib * 1024),
                      int(guest_huge_mib * 1024))
            + mapping(0x7FFF00000000, 0x7FFF00200000, "r-xp", "/usr/lib/libpython3.11.so", 2048))


def test_rss_over_the_guest_is_what_a_process_holds_beside_its_guest_on_every_kind() -> None:
    """A zero-heavy anonymous guest (QEMU's load: the zero pages no one wrote are never resident) made
    "rss_mib - guest" negative; a hugetlb guest is outside RSS, a memfd guest inside it (RssShmem).  The
    column is the peak RSS plus the huge pages, less the guest's pages present: the same 30 MiB on all three."""
    from migrate.metrics import memory_held

    kinds = {  # a 1 GiB guest: (/proc/self/status, /proc/self/smaps) of the process at the end
        "anon, 30% zero pages never written": (_status(800, 791), _smaps(770)),
        "memfd": (_status(1054, 21, shmem=1024), _smaps(1024, shared=True)),
        "hugetlb": (_status(30, 21, hugetlb=1024), _smaps(0, guest_huge_mib=1024, shared=True)),
    }
    for kind, (status, smaps) in kinds.items():
        held = memory_held(GUEST_BASE, 1 << 30, status, smaps).to_json()
        dst = _dst(rss_mib=held["peak_rss"], memory_mib=held)
        s = bl.summarize(dst, {"rss_mib": held["peak_rss"], "memory_mib": held}, 1024)
        assert s["rss_over_guest_mib_dst"] == s["rss_over_guest_mib_src"] == 30.0, (kind, held)
    held = memory_held(GUEST_BASE, 1 << 30, *kinds["anon, 30% zero pages never written"])
    assert held.peak_rss - 1024 == -224  # what the column said before
    assert (held.guest_present, held.rss_anon, held.rss_file) == (770, 791, 9)
    huge = memory_held(GUEST_BASE, 1 << 30, *kinds["hugetlb"])
    assert (huge.hugetlb, huge.guest_present, huge.peak_rss) == (1024, 1024, 30)
    assert memory_held(0x1000, 1 << 30, *kinds["memfd"]).guest_present == 0  # no guest there: nothing is its own
    # Metrics of a command that did not measure it: no figure, never rss_mib - guest.
    assert bl.summarize(_dst(memory_mib=None), {"rss_mib": 800.0}, 1024)["rss_over_guest_mib_src"] is None


def _kind_round(kind_gbps: float, placer: float, kind_p50: float, floor_p50: float, kind_faults: int,
                downtimes: tuple[float, float] = (0.5, 0.7)) -> dict:
    """A memory round with anon and hugetlb: each kind's busy and qemu runs and its own references."""
    def run(faults: int, gbps: float, p50: float, total_ms: float, total_s: float, downtime: float,
            beyond: float) -> dict:
        stall = dict(_dst()["vcpu_stall_us"], p50=p50, total_ms=total_ms)
        return bl.summarize(_dst(faults=faults, stream_gbps=gbps, vcpu_stall_us=stall, total_s=total_s,
                                 downtime_ms=downtime, memory_mib=_held(beyond)), {"memory_mib": _held(20.0)}, 1024)

    def refs(gbps: float, p50: float) -> dict:
        return {"placer_gbps": gbps}, {"fault_idle_us": {"p50": p50, "p99": 2 * p50, "max": 9 * p50},
                                       "fault_loaded_us": {"p50": p50, "p99": 4 * p50, "max": 9 * p50}}

    (ap, af), (hp, hf) = refs(1.5, 25.0), refs(placer, floor_p50)
    return {"refs": {"anon:placer_same": ap, "anon:floor_same": af, "hugetlb:placer_same": hp,
                     "hugetlb:floor_same": hf},
            "runs": {"anon:busy": run(4000, 1.2, 50.0, 1000.0, 1.0, 0.8, 30.0),
                     "anon:qemu": run(3000, 1.0, 50.0, 800.0, 0.8, 0.9, 31.0),
                     "hugetlb:busy": run(kind_faults, kind_gbps, kind_p50, 250.0, 0.25, downtimes[0], 35.0),
                     "hugetlb:qemu": run(kind_faults // 2, kind_gbps, kind_p50, 80.0, 0.4, downtimes[1], 33.0)}}


def test_memory_section_compares_each_kind_with_references_of_its_page_and_with_anon() -> None:
    rounds = [_kind_round(1.8, 2.0, 1300.0, 1000.0, 200), _kind_round(1.2, 2.0, 2000.0, 800.0, 100, (1.5, 2.5))]
    m = bl.memory_section(rounds, 1024)
    assert m["kinds"] == ["anon", "hugetlb"] and m["guest_mib"] == 1024 and m["rounds"] == 2  # memfd never ran
    h = m["hugetlb"]
    assert h["page_kib"] == 2048
    # Against its own placer and floor, round by round (the 2 MiB floor, not anon's 25 µs).
    assert h["scenarios"]["busy"]["stream_ratio_by_round"] == [0.9, 0.6] and h["stream_ratio"] == 0.75
    assert h["scenarios"]["busy"]["fault_p50_ratio_by_round"] == [1.3, 2.5] and h["fault_p50_ratio"] == 1.9
    assert h["placer_gbps"] == 2.0 and h["floor_p50_us"] == 900.0 and h["stall_p50_us"] == 1650.0
    # Against anon's run of the same guest in the same round: what 2 MiB pages buy.
    busy = h["scenarios"]["busy"]
    assert busy["faults_vs_anon_by_round"] == [0.05, 0.025] and busy["faults_vs_anon"] == 0.0375
    assert busy["stall_total_ms_vs_anon"] == 0.25 and busy["total_s_vs_anon"] == 0.25
    assert h["scenarios"]["qemu"]["stall_total_ms_vs_anon"] == 0.1
    assert m["anon"]["scenarios"]["busy"]["faults_vs_anon"] == 1.0
    # Downtime over both guests of the kind, every round; held beyond the guest, worst run.
    assert h["downtime_runs_ms"] == [0.5, 0.7, 1.5, 2.5] and h["downtime_ms"] == 1.1
    assert h["rss_over_guest_mib"] == {"src": 20.0, "dst": 35.0}
    t = h["targets"]
    assert (t["stream_ratio"]["met"], t["stream_ratio"]["runs_met"]) == (False, [1, 2])
    assert (t["fault_p50_ratio"]["met"], t["fault_p50_ratio"]["runs_met"]) == (True, [1, 2])
    assert (t["downtime_ms"]["met"], t["downtime_ms"]["runs_met"]) == (False, [2, 4])
    assert m["anon"]["targets"]["stream_ratio"]["value"] == 0.8  # 1.2 over anon's own placer, 1.5


def test_memory_rounds_interleave_every_kind_with_anon_and_its_own_references() -> None:
    import argparse

    import refbench

    kinds = ["anon", "memfd", "hugetlb"]
    first, second = refbench.memory_round_steps(kinds, 0), refbench.memory_round_steps(kinds, 1)
    assert first[:4] == [("ref", "anon:placer_same"), ("mig", "anon:busy"), ("ref", "anon:floor_same"),
                         ("mig", "anon:qemu")]
    assert [k for _, k in first[8:]] == ["hugetlb:placer_same", "hugetlb:busy", "hugetlb:floor_same", "hugetlb:qemu"]
    assert [k.split(":")[0] for _, k in second[::4]] == ["memfd", "hugetlb", "anon"]  # no kind always first
    args = refbench.parser().parse_args(["--only", "memory", "--memory-kinds", "anon,hugetlb"])
    assert args.only == "memory" and args.memory_kinds == ["anon", "hugetlb"]
    assert refbench.parser().parse_args([]).memory is True  # a full run has the section
    src = refbench.source_args("qemu", 1024, argparse.Namespace(idle_rate=1, run_before=1.0), None, "hugetlb")
    assert src[-6:] == ["--memory", "hugetlb", "--rate", "25000", "--zero-fraction", "0.3"]
    assert "--memory" not in refbench.source_args("qemu", 1024, argparse.Namespace(idle_rate=1, run_before=1.0), None)


def test_report_prints_kind_by_figure_with_the_references_beside() -> None:
    import refreport

    m = bl.memory_section([_kind_round(1.8, 2.0, 1300.0, 1000.0, 200)], 1024)
    m["skipped"] = {"memfd": "no pool\nmore"}
    text = refreport.memory(m)
    header = next(line for line in text if "x placer" in line).split()
    assert header[:8] == ["kind", "guest", "page", "ok", "GB/s", "placer", "x", "placer"]
    huge = next(line for line in text if line.split()[:2] == ["hugetlb", "busy"]).split()
    assert huge[2:7] == ["2048K", "yes", "1.80", "2.00", "0.90"]  # its stream beside its own placer
    assert huge[7:10] == ["1300.0", "1000.0", "1.30"]  # its stall p50 beside its own floor
    assert "targets (issue 22, hugetlb):" in "\n".join(text)
    assert text[-1] == "\nmemory kinds: memfd skipped: no pool"


def test_the_bench_gives_back_the_huge_pages_it_added_not_a_size_it_read(tmp_path, monkeypatch) -> None:
    """Another program (a test suite's fixture) may raise or lower the pool while the bench runs: the
    bench lowers it by what it added, and never below zero."""
    import refbench

    pool = tmp_path / "nr_hugepages"
    monkeypatch.setattr(refbench, "NR_HUGEPAGES", pool)
    pool.write_text("1064\n")  # 32 of another program's, 1032 the bench added
    refbench.give_back_huge_pages(1032)
    assert pool.read_text() == "32"
    pool.write_text("100")  # the other program put back its own size meanwhile, taking some of ours
    refbench.give_back_huge_pages(1032)
    assert pool.read_text() == "0"
    refbench.give_back_huge_pages(0)
    assert pool.read_text() == "0"
