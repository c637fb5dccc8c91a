"""The text ``scripts/bench`` prints from its results (bench/results.json), section by section.

Each function returns the lines of one section (a line may start with "\\n":
a blank line before it); ``report`` puts them together.  No I/O, so the tests
can read a report made from hand-written results.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import benchlib as bl
from benchlib import fmt

MET = {True: "met", False: "NOT MET", None: "n/a"}

# TLS against plaintext: the figures compared twin by twin, as the table labels them.
PAIR_LABELS = {"total_s": "postcopy s", "stream_gbps": "stream GB/s", "stall_p50_us": "stall p50 us",
               "service_p50_us": "service p50 us", "downtime_ms": "downtime ms",
               "cpu_src_user_s": "source CPU user s", "cpu_src_sys_s": "source CPU sys s",
               "cpu_dst_user_s": "dest. CPU user s", "cpu_dst_sys_s": "dest. CPU sys s"}


def table(rows: Sequence[Sequence[str]], cols: Sequence[str], indent: str = "  ") -> list[str]:
    """Right-aligned columns, each as wide as its widest cell or header."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)] if rows else []
    out = [indent + "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for r in rows:
        out.append(indent + "  ".join(x.rjust(w) for x, w in zip(r, widths)))
    return out


def warmup(results: Mapping) -> list[str]:
    out = []
    warm = results.get("warmup", {})
    if warm.get("memory"):
        m = warm["memory"]
        out.append(f"warm-up: touched {m['mib']} MiB at {fmt(m['touch_gbps'])} GB/s"
                   f" ({'cold: first touch' if m['touch_gbps'] < 1.0 else 'already warm'})"
                   + (f"; one untimed migration ({warm['migration']})" if warm.get("migration") else ""))
    if results.get("tcp_gbps") is not None:
        out.append(f"loopback TCP: {fmt(results['tcp_gbps'])} GB/s")
    return out


def references(by_size: Mapping[str, Mapping], vcpus: int) -> list[str]:
    """The C references of every size: medians and round by round."""
    if not by_size:
        return []
    out = [f"\nC references, medians over rounds (same load = {vcpus} busy spinner threads, as many as the "
           "guest's vCPUs; 'stream' = a second connection saturates with an ideal-placer stream):"]
    rows = []
    for mib, refs in by_size.items():
        for kind, label in (("placer_unloaded", "ideal placer, unloaded"),
                            ("placer_same", "ideal placer, same load")):
            if kind in refs:
                rows.append([mib, label, f"{fmt(refs[kind]['gbps'])} GB/s",
                             " ".join(fmt(x) for x in refs[kind]["by_round"])])
        for kind, label in (("floor_unloaded", "fault floor, unloaded"), ("floor_same", "fault floor, same load")):
            if kind in refs:
                li, ws = refs[kind]["link_idle_us"], refs[kind]["with_stream_us"]
                rows.append([mib, label,
                             f"link idle p50 {fmt(li['p50'], 1)} p99 {fmt(li['p99'], 1)} max {fmt(li['max'], 0)} us; "
                             f"stream p50 {fmt(ws['p50'], 1)} p99 {fmt(ws['p99'], 1)} max {fmt(ws['max'], 0)} us",
                             " ".join(f"{fmt(a, 1)}/{fmt(b, 0)}" for a, b in
                                      zip(refs[kind]["by_round_p50_us"], refs[kind]["by_round_p99_us"]))])
    return out + table(rows, ["MiB", "reference", "median", "by round (floor: stream p50/p99)"])


def errors(results: Mapping) -> list[str]:
    return [f"\nERROR: {results[key]}" for key in ("refs_error", "error") if results.get(key)]


def scenarios(rows_by_key: Mapping[str, Mapping]) -> list[str]:
    """uffd-migrate's rows: figures, ratios against the references, worst RSS."""
    out = ["\nuffd-migrate, medians over rounds; ratios are medians of each round's migration over the reference "
           "next to it (idle: unloaded references; the others: same load):"]
    cols = ["scenario", "MiB", "runs", "ok", "total s", "GB/s", "x placer", "guest GB/s", "down ms", "stall p50",
            "p99 us", "max us", "total ms", "stalled", "x p50", "x p99", "rss+src", "rss+dst"]
    rows = []
    for key, row in rows_by_key.items():
        scen, mib = key.rsplit("/", 1)
        rows.append([scen, mib, fmt(row["runs"]), fmt(row["verified"]), fmt(row["total_s"]),
                     fmt(row["stream_gbps"]), fmt(row["stream_ratio"]), fmt(row["guest_gbps"]),
                     fmt(row["downtime_ms"]),
                     fmt(row["stall_p50_us"], 1), fmt(row["stall_p99_us"], 0), fmt(row["stall_max_us"], 0),
                     fmt(row["stall_total_ms"], 0), fmt(row["stalled_fraction"]),
                     fmt(row["fault_p50_ratio"]), fmt(row["fault_p99_ratio"]),
                     fmt(row["worst_rss_over_guest_mib_src"], 1), fmt(row["worst_rss_over_guest_mib_dst"], 1)])
    out += table(rows, cols)
    out.append("  GB/s: bytes on the bulk stream per second of postcopy (zero pages and pages sent on request are "
               "not on it); guest GB/s: guest memory made present per second;\n  stalled: the vCPUs' "
               "share of the postcopy spent stalled (total ms / (vCPUs x total s)).")
    return out


def p50_p99_total(fig: Mapping, p50: str = "p50", p99: str = "p99", total: str = "total_ms") -> str:
    """One cell of the urgent path: p50/p99/total ms."""
    return f"{fmt(fig[p50], 1)}/{fmt(fig[p99], 0)}/{fmt(fig[total], 0)}"


def hops(rows_by_key: Mapping[str, Mapping]) -> list[str]:
    """The urgent path hop by hop, then the service and the vCPU stall."""
    out = ["\nurgent path, hop by hop (medians over rounds of each run's p50 / p99 / total ms; "
           "service = request sent -> pages placed = network + source_held + reply_to_placed):"]
    cols = ["scenario", "requests", *bl.HOPS, "service", "vCPU stall", "rest p50"]
    rows = []
    for key, row in rows_by_key.items():
        hops_us = row.get("hops_us", {})
        cells = [p50_p99_total(hops_us[h]) if h in hops_us else "-" for h in bl.HOPS]
        rows.append([key, fmt(row.get("requests")), *cells,
                     p50_p99_total(row, "service_p50_us", "service_p99_us", "service_total_ms"),
                     p50_p99_total(row, "stall_p50_us", "stall_p99_us", "stall_total_ms"),
                     fmt(row.get("unaccounted_p50_us"), 1)])
    out += table(rows, cols)
    out.append("  rest p50 = stall p50 - fault_to_request p50 - service p50: the fault reader's and the vCPU's "
               "wake-ups, which no hop covers (a difference of medians: an indication).")
    return out


def latency_dists(rows_by_key: Mapping[str, Mapping]) -> list[str]:
    """The stalls in QEMU's postcopy-latency-dist buckets, where the destination reported them."""
    dists = {k: r["postcopy_latency_dist"] for k, r in rows_by_key.items() if r.get("postcopy_latency_dist")}
    if not dists:
        return ["\n(no postcopy-latency-dist in the destination's vcpu_stall_us: not shown)"]
    out = ["\nvCPU stalls in QEMU's postcopy-latency-dist layout (bucket n: [2^n, 2^(n+1)) us; summed over runs):"]
    for key, d in dists.items():
        cells = [f"{bl.dist_label(n)}:{c}" for n, c in enumerate(d) if c]
        out.append(f"  {key:<12} {' '.join(cells) or '(empty)'}")
    return out


def headline(results: Mapping) -> list[str]:
    """Downtime over every run and QEMU's load."""
    out = []
    if results.get("downtime_runs_ms"):
        lo, hi = bl.spread(results["downtime_runs_ms"]) or (None, None)
        out.append(f"\ndowntime: median {fmt(results['downtime_ms'])} ms, {fmt(lo)}-{fmt(hi)} "
                   f"({results['downtime_basis']})")
    if results.get("qemu_load", {}).get("runs"):
        q = results["qemu_load"]
        out.append(f"QEMU's load ({q['guest_mib']} MiB): stream {fmt(q['stream_gbps'])} GB/s "
                   f"(before: {bl.BEFORE['qemu_stream_gbps'][0]}-{bl.BEFORE['qemu_stream_gbps'][1]}), "
                   f"total vCPU stall {fmt(q['stall_total_ms'], 0)} ms")
    return out


def target_line(name: str, t: Mapping, by_round: Sequence[float | None] | None = None) -> str:
    """One target: value, bound, met, in how many runs, what it is (and the figure round by round)."""
    runs = f"{t['runs_met'][0]}/{t['runs_met'][1]} runs" if t.get("runs_met") else ""
    rounds = f" [{' '.join(fmt(x) for x in by_round)}]" if by_round is not None else ""
    return (f"  {name:<24} {fmt(t['value']):>9} {t['target']:<8} {MET[t['met']]:<8} {runs:<9} {t['what']}{rounds}"
            + (f"  ({t['note']})" if t.get("note") else ""))


def targets(results: Mapping) -> list[str]:
    if not results.get("targets"):
        return []
    return ["\ntargets (issue 9):", *(target_line(name, t) for name, t in results["targets"].items())]


def tls_pairs(pairs: Mapping[str, Mapping]) -> list[str]:
    """Each TLS twin against its plaintext twin, figure by figure."""
    cols, rows = ["figure"], []
    for t in pairs:
        cols += [bl.TLS_TWINS[t], t, "delta", "by round"]
    for f, label in PAIR_LABELS.items():
        row = [label]
        for figs in pairs.values():
            x = figs[f]
            nd = 1 if f.endswith("_us") else 3 if f.startswith("cpu_") or f == "stream_gbps" else 2
            row += [fmt(x["plaintext"], nd), fmt(x["tls"], nd), fmt(x["delta"], nd),
                    " ".join(fmt(d, nd) for d in x["delta_by_round"])]
        rows.append(row)
    return table(rows, cols)


def tls(section: Mapping | None) -> list[str]:
    """TLS against plaintext (issue 13): the pairs, the CPU, the RSS and the targets."""
    if not section:
        return []
    if section.get("error"):
        return [f"\nTLS: not measured: {section['error'].splitlines()[0]}"]
    if "targets" not in section:
        return []
    out = [f"\nTLS against plaintext ({section['guest_mib']} MiB; each TLS run right after its plaintext twin in "
           f"every round; medians, deltas = medians of per-round TLS - plaintext):",
           f"  negotiated: {section['cipher'] or '-'}"]
    aes = section.get("aes_128_gcm_one_core") or {}
    if aes.get("encrypt_gbps"):
        out.append(f"  AES-128-GCM on one core (openssl speed, 16 KiB, per CPU second): encrypt "
                   f"{fmt(aes['encrypt_gbps'])} GB/s, decrypt {fmt(aes.get('decrypt_gbps'))} GB/s")
    out += tls_pairs(section.get("pairs", {}))
    out.append("  CPU: each process from start to exit, from its rusage (the source fills its guest first, the "
               "destination verifies last: compare twins, not absolute figures).")
    rss = section.get("rss_over_guest_mib", {})
    out.append(f"  RSS over the guest with TLS, worst run: source {fmt(rss.get('src'), 1)} MiB, "
               f"destination {fmt(rss.get('dst'), 1)} MiB")
    out.append("\ntargets (issue 13, TLS):")
    by_round = {"stream_ratio": section["stream_ratio_by_round"],
                "stall_p50_delta_us": section["stall_p50_delta_us_by_round"],
                "downtime_ms": section["downtime_runs_ms"]}
    out += [target_line(name, t, by_round.get(name, [])) for name, t in section["targets"].items()]
    return out


def scaling(sc: Mapping | None) -> list[str]:
    if not sc:
        return []
    return [f"\nscaling: idle s/GiB grows {fmt(sc['idle_s_per_gib_growth'])} from {sc['sizes_mib'][0]} MiB to "
            f"{sc['sizes_mib'][1]} MiB; the C placer's own {fmt(sc['placer_s_per_gib_growth'])}; "
            f"ours beyond it {fmt(sc['beyond_placer'])}"]


def memory(section: Mapping | None) -> list[str]:
    """The memory kinds (issue 22): kind x figure, each kind's own same-load references beside its figures,
    the ratios to anon's runs of the same round, and the targets."""
    if not section or not section.get("kinds"):
        return [f"\nmemory kinds: {k} skipped: {e.splitlines()[0]}" for k, e in (section or {}).get("skipped", {}).items()]
    out = [f"\nmemory kinds ({section['guest_mib']} MiB, {section['rounds']} rounds; each kind's placer and fault floor "
           "move its own page in its own memory under the same load; x = median of per-round ratios; vs anon = "
           "against anon's run of the same guest in the same round):"]
    cols = ["kind", "guest", "page", "ok", "GB/s", "placer", "x placer", "stall p50", "floor p50", "x p50",
            "p99 us", "floor p99", "x p99", "faults", "vs anon", "stall ms", "vs anon", "total s", "vs anon",
            "down ms", "held+src", "held+dst"]
    rows = []
    for kind in section["kinds"]:
        k = section[kind]
        refs, floor = k["refs"], k["refs"].get("floor_us") or {}
        for scen, row in k["scenarios"].items():
            rows.append([kind, scen, f"{k['page_kib']}K", fmt(row["verified"]), fmt(row["stream_gbps"]),
                         fmt(refs["placer_gbps"]), fmt(row["stream_ratio"]),
                         fmt(row["stall_p50_us"], 1), fmt(floor.get("p50"), 1), fmt(row["fault_p50_ratio"]),
                         fmt(row["stall_p99_us"], 0), fmt(floor.get("p99"), 0), fmt(row["fault_p99_ratio"]),
                         fmt(row["faults"], 0), fmt(row["faults_vs_anon"], 3),
                         fmt(row["stall_total_ms"], 0), fmt(row["stall_total_ms_vs_anon"]),
                         fmt(row["total_s"]), fmt(row["total_s_vs_anon"]), fmt(row["downtime_ms"]),
                         fmt(row["worst_rss_over_guest_mib_src"], 1), fmt(row["worst_rss_over_guest_mib_dst"], 1)])
    out += table(rows, cols)
    out.append("  GB/s: the bulk stream (pages sent on request are not on it); held+: MiB a process held beyond its "
               "guest's present pages (peak RSS + huge pages - guest), worst run.")
    for kind in section["kinds"]:
        out.append(f"\ntargets (issue 22, {kind}):")
        k = section[kind]
        by_round = {"stream_ratio": k["scenarios"].get("busy", {}).get("stream_ratio_by_round"),
                    "fault_p50_ratio": k["scenarios"].get("busy", {}).get("fault_p50_ratio_by_round"),
                    "downtime_ms": k["downtime_runs_ms"]}
        out += [target_line(name, t, by_round.get(name)) for name, t in k["targets"].items()]
    out += [f"\nmemory kinds: {kind} skipped: {e.splitlines()[0]}" for kind, e in section.get("skipped", {}).items()]
    return out


def failures(rounds_by_size: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """Every step of every round that failed, with its message."""
    return [f"\n{step} at {mib} MiB, round {i + 1} failed: {err}"
            for mib, rounds in rounds_by_size.items() for i, rnd in enumerate(rounds)
            for step, err in rnd.get("errors", {}).items()]


def report(results: Mapping) -> list[str]:
    """The whole report of a run, as lines (what ``print("\\n".join(...))`` shows)."""
    out = warmup(results)
    out += references(results.get("refs", {}).get("by_size", {}), results.get("vcpus"))
    out += errors(results)
    rows_by_key = results.get("scenarios", {})
    if rows_by_key:
        out += scenarios(rows_by_key) + hops(rows_by_key) + latency_dists(rows_by_key)
    out += headline(results) + targets(results) + tls(results.get("tls"))
    out += scaling(results.get("scaling")) + memory(results.get("memory"))
    out += failures(results.get("rounds", {}))
    if results.get("memory_rounds"):  # its steps are named by kind ("hugetlb:busy")
        out += failures({str(results["memory"]["guest_mib"]): results["memory_rounds"]})
    return out
