"""The arithmetic of the benches: per-run figures, medians, paired ratios, targets, rows, cells.

``bench/refbench.py`` (``scripts/bench``) and ``bench/modebench.py``
(``scripts/bench-modes``) run things and print; what they compute from the
metrics the commands write and from the C references' JSON is here, as pure
functions with no I/O, so that the tests check it without starting a process.
It reads the page size from the native module: the benches run under the
project's venv (``bench/launcher.py``).

The bench interleaves: each round runs a C reference, then the migration it is
compared with, then the next reference, and so on, so a reference and its
migration see the same machine.  A ratio is therefore taken per round (the
migration over the reference run next to it) and the rounds' ratios are
summarized by their median; every other figure is the median over rounds.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from migrate.protocol import PAGE_SIZE

# The hops of the urgent path, in the order a request crosses them: the keys
# of the destination's ``hops_us``.  Its ``fault_service_us`` is the sum of the
# last three, request by request.
HOPS: tuple[str, ...] = ("fault_to_request", "network", "source_held", "reply_to_placed")

# Where the destination reports its stall histogram in QEMU's
# ``postcopy-latency-dist`` layout (bucket N counts stalls in [2**N, 2**(N+1))
# µs), inside ``vcpu_stall_us``.  Absent: not reported.
LATENCY_DIST_KEY = "qemu_dist"

# Figures of the code before the native data plane, from issue 9 and from
# docs/performance.md at commit c153aad (a full run of 9966862).
BEFORE = {
    # The fresh-clone demo (1 GiB, 2 vCPUs uniform flat out): total vCPU stall.
    "demo_stall_total_ms": 4500.0,
    # QEMU's load (1 GiB, 2 vCPUs x 25,000 uniform accesses/s, 30% zero pages).
    "qemu_stream_gbps": (0.40, 0.51),
}


def median(xs: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    return a / b if a is not None and b else None


def paired_ratios(nums: Sequence[float | None], dens: Sequence[float | None]) -> list[float | None]:
    """Round by round: each migration's figure over the reference measured next to it."""
    if len(nums) != len(dens):
        raise ValueError(f"{len(nums)} migrations against {len(dens)} references")
    return [ratio(a, b) for a, b in zip(nums, dens)]


def paired_deltas(nums: Sequence[float | None], subs: Sequence[float | None]) -> list[float | None]:
    """Round by round: each run's figure minus its twin's in the same round (None where either is missing)."""
    if len(nums) != len(subs):
        raise ValueError(f"{len(nums)} runs against {len(subs)} twins")
    return [a - b if a is not None and b is not None else None for a, b in zip(nums, subs)]


def spread(xs: Iterable[float | None]) -> tuple[float, float] | None:
    """(min, max) of the values that are not None."""
    vals = [x for x in xs if x is not None]
    return (min(vals), max(vals)) if vals else None


# -- one run ---------------------------------------------------------------------------------------

def latency_dist(stall: Mapping[str, object]) -> list[int] | None:
    """The stall histogram in QEMU's ``postcopy-latency-dist`` layout, if the destination reported it."""
    value = stall.get(LATENCY_DIST_KEY)
    if isinstance(value, list) and all(isinstance(n, int) for n in value):
        return value
    return None


def dist_label(n: int) -> str:
    """The range of bucket n of a ``postcopy-latency-dist``: [2**n, 2**(n+1)) µs."""
    def us(v: int) -> str:
        return f"{v // 1_000_000}s" if v >= 1_000_000 else f"{v // 1000}ms" if v >= 1000 else f"{v}us"
    return f"{us(2 ** n)}-{us(2 ** (n + 1))}"


def add_dists(dists: Iterable[list[int] | None]) -> list[int] | None:
    """Bucket-wise sum of several runs' distributions (same layout); None if no run had one."""
    present = [d for d in dists if d is not None]
    if not present:
        return None
    out = [0] * max(len(d) for d in present)
    for d in present:
        for i, n in enumerate(d):
            out[i] += n
    return out


def held_beyond_guest(side: Mapping) -> float | None:
    """MiB a process held beyond its guest: its ``memory_mib.beyond_guest``; None when it did not say.

    Not ``rss_mib - guest MiB``: a guest's zero pages that no one wrote are never resident (the
    shared zero page), which made that difference negative for a zero-heavy guest (QEMU's load at
    4 GiB: -238 MiB), and huge pages are outside RSS altogether.  The process measures it itself
    (``migrate.metrics.memory_held``): its peak RSS plus the huge pages it maps, less the guest's
    pages present (smaps), so a guest's pages count once, whatever its kind, and never negatively.
    """
    held = side.get("memory_mib")
    if not isinstance(held, Mapping) or held.get("beyond_guest") is None:
        return None
    return round(held["beyond_guest"], 1)


def summarize(dst: Mapping, src: Mapping, mib: float, wall_s: float | None = None,
              cpu: Mapping[str, Mapping[str, float]] | None = None) -> dict:
    """The figures one migration is judged by, picked out of both sides' metrics.

    ``cpu`` is each side's CPU time as the bench measured it when the process
    ended ({"src": {"user": s, "sys": s}, "dst": ...}): the whole process, from
    start to exit (the source fills its guest first, the destination verifies
    last), so it is compared between twins, never read alone as the stream's cost.
    """
    stall = dst.get("vcpu_stall_us") or {}
    service = dst.get("fault_service_us") or {}
    hops = dst.get("hops_us") or {}
    total = dst.get("total_s")
    pages = dst.get("pages_total")
    vcpus = dst.get("vcpus")
    out = {
        "guest_mib": mib,
        "verified": dst.get("verified"),
        "pages_placed_of_total": [dst.get("pages_placed"), pages],
        "total_s": total,
        "total_s_per_gib": round(total / (mib / 1024), 3) if total is not None and mib else None,
        "stream_gbps": dst.get("stream_gbps"),
        # Guest memory made present per second, zero pages and pages sent on
        # request included: the bulk stream alone carries neither.
        # pages_total counts the memory's own pages (2 MiB on hugetlb: page_size).
        "guest_gbps": round(pages * dst.get("page_size", PAGE_SIZE) / total / 1e9, 3) if pages and total else None,
        "downtime_ms": dst.get("downtime_ms"),
        "stall_count": stall.get("count"),
        "stall_p50_us": stall.get("p50"),
        "stall_p99_us": stall.get("p99"),
        "stall_max_us": stall.get("max"),
        "stall_total_ms": stall.get("total_ms"),
        # Share of the vCPUs' postcopy time spent stalled: near 1, the total
        # stall is the vCPUs times the postcopy's length, and only a faster
        # stream (or fewer faults) can shrink it.
        "stalled_fraction": (round(stall["total_ms"] / (vcpus * total * 1000), 3)
                             if stall.get("total_ms") is not None and vcpus and total else None),
        "service_p50_us": service.get("p50"),
        "service_p99_us": service.get("p99"),
        "service_total_ms": service.get("total_ms"),
        "hops_us": {h: dict(hops[h]) for h in HOPS if isinstance(hops.get(h), Mapping)},
        "faults": dst.get("faults"),
        "requests": dst.get("requests"),
        "pages_placed_urgent": dst.get("pages_placed_urgent"),
        "eexist": dst.get("eexist"),
        "zero_pages": dst.get("zero_pages"),
        # What each process holds beyond its guest, on every memory kind (held_beyond_guest).
        "rss_over_guest_mib_src": held_beyond_guest(src),
        "rss_over_guest_mib_dst": held_beyond_guest(dst),
        "memory": dst.get("memory"),
        "recoveries": len(dst.get("recoveries") or []),
        "wall_s": wall_s,
        # "plaintext", or TLS's protocol and cipher as the destination negotiated them.
        "tls": dst.get("tls"),
    }
    for side in ("src", "dst"):
        for kind in ("user", "sys"):
            v = ((cpu or {}).get(side) or {}).get(kind)
            out[f"cpu_{side}_{kind}_s"] = round(v, 3) if v is not None else None
    dist = latency_dist(stall)
    if dist is not None:
        out["postcopy_latency_dist"] = dist
    return out


# -- several runs ----------------------------------------------------------------------------------

# Figures of a run that a scenario reports as the median over its runs.
MEDIAN_FIELDS: tuple[str, ...] = (
    "total_s", "total_s_per_gib", "stream_gbps", "guest_gbps", "downtime_ms", "stall_count", "stall_p50_us",
    "stall_p99_us", "stall_max_us", "stall_total_ms", "stalled_fraction", "service_p50_us", "service_p99_us",
    "service_total_ms", "faults", "requests", "pages_placed_urgent", "eexist", "zero_pages",
    "rss_over_guest_mib_src", "rss_over_guest_mib_dst", "wall_s",
    "cpu_src_user_s", "cpu_src_sys_s", "cpu_dst_user_s", "cpu_dst_sys_s",
)


def combine(runs: Sequence[Mapping]) -> dict:
    """A scenario's runs as one row: medians, the hops' medians, and whether every run verified."""
    row: dict[str, object] = {"runs": len(runs), "guest_mib": runs[0]["guest_mib"] if runs else None}
    verified = [r.get("verified") for r in runs]
    row["verified"] = None if not runs or None in verified else all(verified)
    for f in MEDIAN_FIELDS:
        row[f] = median(r.get(f) for r in runs)
    row["hops_us"] = {
        h: {s: median(r["hops_us"][h].get(s) for r in runs if h in r.get("hops_us", {}))
            for s in ("count", "p50", "p99", "max", "total_ms")}
        for h in HOPS if any(h in r.get("hops_us", {}) for r in runs)
    }
    # Worst rather than median: the RSS target holds for every run or it does not.
    for f in ("rss_over_guest_mib_src", "rss_over_guest_mib_dst", "stall_max_us"):
        vals = [r.get(f) for r in runs if r.get(f) is not None]
        row[f"worst_{f}"] = max(vals) if vals else None
    dist = add_dists(r.get("postcopy_latency_dist") for r in runs)
    if dist is not None:
        row["postcopy_latency_dist"] = dist
    row["tls"] = negotiated(r.get("tls") for r in runs)
    return row


def negotiated(values: Iterable[str | None]) -> str | None:
    """What the runs negotiated: the one value they share, or their distinct values joined by " | "."""
    distinct = sorted({v for v in values if v})
    return " | ".join(distinct) if distinct else None


def unaccounted_us(row: Mapping) -> float | None:
    """Roughly what the hops do not see at the median: stall p50 less fault_to_request and service p50.

    The hops start when the fault reader has read the fault and end when the
    reply's UFFDIO_COPY returns; the fault reader's wake-up before them and the
    vCPU's wake-up after them are the rest.  A difference of medians, not the
    median of a difference: an indication, not a measurement.
    """
    stall, service = row.get("stall_p50_us"), row.get("service_p50_us")
    first = (row.get("hops_us") or {}).get("fault_to_request", {}).get("p50")
    if stall is None or service is None:
        return None
    return round(stall - service - (first or 0), 1)


# -- references ------------------------------------------------------------------------------------

def fault_floor(results: Sequence[Mapping], key: str) -> dict[str, float | None]:
    """Median p50/p99/max of several fault_floor runs; key is "fault_idle_us" or "fault_loaded_us"."""
    return {s: median(r[key][s] for r in results) for s in ("p50", "p99", "max")}


# -- targets ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A bound one figure must meet."""

    name: str
    op: str  # ">=" or "<="
    bound: float
    what: str

    def met(self, value: float | None) -> bool | None:
        """True or False; None when the figure was not measured."""
        if value is None:
            return None
        return value >= self.bound if self.op == ">=" else value <= self.bound


def targets(stall_before_ms: float = BEFORE["demo_stall_total_ms"]) -> list[Target]:
    """The targets of issue 9 (the native data plane)."""
    return [
        Target("fault_p50_ratio", "<=", 2, "busy: vCPU stall p50 / same-load C fault floor p50"),
        Target("fault_p99_ratio", "<=", 2, "busy: vCPU stall p99 / same-load C fault floor p99"),
        Target("stall_p50_us", "<=", 100, "busy: vCPU stall p50, µs"),
        Target("stall_max_us", "<=", 20_000, "busy: vCPU stall max, µs"),
        Target("stream_ratio", ">=", 0.9, "busy: stream / same-load C placer"),
        Target("idle_stream_gbps", ">=", 1.0, "idle: stream GB/s (applies when the unloaded placer reaches 1.1)"),
        Target("qemu_stream_gbps", ">=", 1.0, "QEMU's load: stream GB/s"),
        Target("qemu_stall_total_ms", "<=", round(stall_before_ms / 5, 1),
               f"QEMU's load: total vCPU stall, ms (1/5 of {stall_before_ms / 1000:g} s before)"),
        Target("downtime_ms", "<=", 1, "downtime, median ms"),
        Target("rss_over_guest_mib_src", "<=", 32, "source RSS over the guest, worst run, MiB"),
        Target("rss_over_guest_mib_dst", "<=", 32, "destination RSS over the guest, worst run, MiB"),
    ]


IDLE_PLACER_MIN_GBPS = 1.1  # the idle stream target applies only when the machine can do this


def evaluate(values: Mapping[str, float | None], per_run: Mapping[str, Sequence[float | None]],
             placer_unloaded_gbps: float | None, notes: Mapping[str, str] | None = None,
             target_list: Sequence[Target] | None = None) -> dict[str, dict]:
    """Each target: its value, bound, met (True/False/None) and in how many runs it was met.

    ``values`` holds the figure judged (a median, or a worst case); ``per_run``
    the same figure run by run, where there is one, so a reader sees whether
    the median hides a split.  The idle stream target is "not applicable"
    (met None) when the unloaded C placer itself stays under 1.1 GB/s.
    ``target_list`` defaults to issue 9's targets (``targets()``).
    """
    out: dict[str, dict] = {}
    for t in (targets() if target_list is None else target_list):
        v = values.get(t.name)
        entry: dict[str, object] = {"value": v, "target": f"{t.op} {t.bound:g}", "met": t.met(v), "what": t.what}
        runs = [x for x in per_run.get(t.name, ()) if x is not None]
        if runs:
            entry["runs_met"] = [sum(1 for x in runs if t.met(x)), len(runs)]
        if t.name == "idle_stream_gbps" and (placer_unloaded_gbps is None
                                            or placer_unloaded_gbps < IDLE_PLACER_MIN_GBPS):
            entry["met"] = None
            entry["note"] = (f"not applicable: the unloaded C placer reached {placer_unloaded_gbps:.2f} GB/s, "
                             f"under {IDLE_PLACER_MIN_GBPS}" if placer_unloaded_gbps is not None
                             else "not applicable: no placer figure")
        if notes and t.name in notes and "note" not in entry:
            entry["note"] = notes[t.name]
        out[t.name] = entry
    return out


# -- TLS against plaintext (issue 13) ---------------------------------------------------------------

# Each TLS scenario and its plaintext twin: the same guest with the same options,
# plus --tls-cert/--tls-key/--tls-ca on both sides, run right after the twin in
# every round, so that each pair sees the same machine.
TLS_TWINS: dict[str, str] = {"idle_tls": "idle", "busy_tls": "busy"}
TLS_STREAM_PAIR = ("idle_tls", "idle")  # the stream: a nearly idle guest, pure streaming
TLS_STALL_PAIR = ("busy_tls", "busy")  # the fault path: the demo's guest, flat out

# Figures compared pair by pair (plaintext median, TLS median, median of the per-round TLS - plaintext).
CPU_FIELDS: tuple[str, ...] = ("cpu_src_user_s", "cpu_src_sys_s", "cpu_dst_user_s", "cpu_dst_sys_s")
PAIR_FIELDS: tuple[str, ...] = ("total_s", "stream_gbps", "stall_p50_us", "service_p50_us", "downtime_ms",
                                *CPU_FIELDS)


def tls_targets() -> list[Target]:
    """The targets of issue 13 (TLS), each against the plaintext twin measured in the same round."""
    return [
        Target("stream_ratio", ">=", 0.7, "idle: stream with TLS / plaintext stream (per round)"),
        Target("stall_p50_delta_us", "<=", 20, "busy: stall p50 with TLS - plaintext p50 (per round), µs"),
        Target("downtime_ms", "<=", 2, "downtime with TLS, median of the TLS runs, ms"),
    ]


def _r(x: float | None, nd: int = 4) -> float | None:
    return round(x, nd) if x is not None else None


def _rounded(xs: Sequence[float | None], nd: int = 4) -> list[float | None]:
    return [_r(x, nd) for x in xs]


def tls_pair(rounds: Sequence[Mapping], tls: str, plain: str) -> dict[str, dict]:
    """One TLS scenario against its twin, figure by figure: both medians and the median per-round delta."""
    out: dict[str, dict] = {}
    for f in PAIR_FIELDS:
        a = pick(rounds, lambda r: r["runs"][tls][f])
        b = pick(rounds, lambda r: r["runs"][plain][f])
        deltas = _rounded(paired_deltas(a, b))
        out[f] = {"plaintext": _r(median(b)), "tls": _r(median(a)), "delta": _r(median(deltas)),
                  "delta_by_round": deltas}
    return out


def tls_summary(rounds: Sequence[Mapping], notes: Mapping[str, str] | None = None) -> dict:
    """TLS against plaintext over the rounds of one guest size (each round: {"runs": {scenario: summary}}).

    ``stream_ratio``: median over rounds of idle_tls's stream over idle's in the
    same round; ``stall_p50_delta_us``: median over rounds of busy_tls's stall
    p50 minus busy's; ``downtime_ms``: median over every TLS run; ``cipher``:
    what the destinations negotiated (their metrics' ``tls``).  A round that
    lacks either side of a pair counts for neither.
    """
    def fig(name: str, key: str) -> list[float | None]:
        return pick(rounds, lambda r: r["runs"][name][key])

    (s_tls, s_plain), (b_tls, b_plain) = TLS_STREAM_PAIR, TLS_STALL_PAIR
    stream = _rounded(paired_ratios(fig(s_tls, "stream_gbps"), fig(s_plain, "stream_gbps")))
    stall = _rounded(paired_deltas(fig(b_tls, "stall_p50_us"), fig(b_plain, "stall_p50_us")))
    tls_runs = [r["runs"][s] for r in rounds for s in TLS_TWINS if s in r.get("runs", {})]
    downtimes = [x["downtime_ms"] for x in tls_runs if x.get("downtime_ms") is not None]
    out: dict[str, object] = {
        "cipher": negotiated(x.get("tls") for x in tls_runs),
        "stream_ratio": median(stream),
        "stall_p50_delta_us": median(stall),
        "downtime_ms": median(downtimes),
        "stream_ratio_by_round": stream,
        "stall_p50_delta_us_by_round": stall,
        "downtime_runs_ms": downtimes,
        "runs": len(tls_runs),
        "pairs": {tls: tls_pair(rounds, tls, plain) for tls, plain in TLS_TWINS.items()
                  if any(tls in r.get("runs", {}) for r in rounds)},
    }
    values = {"stream_ratio": out["stream_ratio"], "stall_p50_delta_us": out["stall_p50_delta_us"],
              "downtime_ms": out["downtime_ms"]}
    per_run = {"stream_ratio": stream, "stall_p50_delta_us": stall, "downtime_ms": downtimes}
    out["targets"] = evaluate(values, per_run, None, notes, tls_targets())
    return out


def pick(rounds: Sequence[Mapping], path: Callable[[Mapping], float | None]) -> list[float | None]:
    """One figure from every round, None where that round lacks it."""
    out = []
    for r in rounds:
        try:
            out.append(path(r))
        except (KeyError, TypeError):
            out.append(None)
    return out


# -- scripts/bench: a run's rows, references and headline figures ---------------------------------

# The references a scenario is compared with, by the load they run under ("unloaded": no spinner;
# "same": as many busy spinner threads as the guest has vCPUs).
PLACER_REF: dict[str, str] = {"unloaded": "placer_unloaded", "same": "placer_same"}
FLOOR_REF: dict[str, str] = {"unloaded": "floor_unloaded", "same": "floor_same"}


def scenario_rows(rounds: Sequence[Mapping], mib: int, loads: Mapping[str, str]) -> dict[str, dict]:
    """Each scenario at one size: medians over rounds and the paired ratios, keyed "scenario/mib".

    ``rounds``: {"refs": {kind: reference JSON}, "runs": {scenario: summary}} each;
    ``loads``: every scenario's references' load, in the order the rows are listed.
    """
    rows = {}
    for s in [s for s in loads if any(s in r["runs"] for r in rounds)]:
        load = loads[s]
        placer, floor = PLACER_REF[load], FLOOR_REF[load]
        have = [r for r in rounds if s in r["runs"]]
        row = combine([r["runs"][s] for r in have])
        row["load"] = load
        ratios = {
            "stream_ratio": paired_ratios(
                pick(have, lambda r: r["runs"][s]["stream_gbps"]),
                pick(have, lambda r: r["refs"][placer]["placer_gbps"])),
            "fault_p50_ratio": paired_ratios(
                pick(have, lambda r: r["runs"][s]["stall_p50_us"]),
                pick(have, lambda r: r["refs"][floor]["fault_loaded_us"]["p50"])),
            "fault_p99_ratio": paired_ratios(
                pick(have, lambda r: r["runs"][s]["stall_p99_us"]),
                pick(have, lambda r: r["refs"][floor]["fault_loaded_us"]["p99"])),
        }
        for k, v in ratios.items():
            row[k] = median(v)
            row[f"{k}_by_round"] = v
        row["unaccounted_p50_us"] = unaccounted_us(row)
        rows[f"{s}/{mib}"] = row
    return rows


def ref_summary(rounds: Sequence[Mapping]) -> dict[str, dict]:
    """Medians of each reference over the rounds it ran in."""
    refs: dict[str, dict] = {}
    for kind in ("placer_unloaded", "placer_same"):
        vals = pick(rounds, lambda r: r["refs"][kind]["placer_gbps"])
        if any(v is not None for v in vals):
            refs[kind] = {"gbps": median(vals), "by_round": vals}
    for kind in ("floor_unloaded", "floor_same"):
        got = [r["refs"][kind] for r in rounds if kind in r["refs"]]
        if got:
            refs[kind] = {"link_idle_us": fault_floor(got, "fault_idle_us"),
                          "with_stream_us": fault_floor(got, "fault_loaded_us"),
                          "by_round_p50_us": [g["fault_loaded_us"]["p50"] for g in got],
                          "by_round_p99_us": [g["fault_loaded_us"]["p99"] for g in got]}
    return refs


def floors(refs: Mapping[str, Mapping], spinners: int) -> dict:
    """The C references at the headline size (``ref_summary`` of its rounds), as results.json's "floors"."""
    return {
        "placer_unloaded_gbps": refs.get("placer_unloaded", {}).get("gbps"),
        "placer_same_load_gbps": refs.get("placer_same", {}).get("gbps"),
        "fault_unloaded_us": refs.get("floor_unloaded", {}).get("link_idle_us"),
        "fault_unloaded_with_stream_us": refs.get("floor_unloaded", {}).get("with_stream_us"),
        "fault_same_load_us": refs.get("floor_same", {}).get("with_stream_us"),
        "fault_same_load_link_idle_us": refs.get("floor_same", {}).get("link_idle_us"),
        "spinners": spinners,
    }


def runs_of(rounds: Iterable[Mapping], scenarios: Iterable[str]) -> list[dict]:
    """Every run of these scenarios in these rounds, round by round."""
    names = list(scenarios)
    return [r["runs"][s] for r in rounds for s in names if s in r["runs"]]


def worst(runs: Iterable[Mapping], key: str) -> list[float]:
    """The figure of every run that has it (the list a worst case is the max of)."""
    return [x[key] for x in runs if x.get(key) is not None]


# The issue-9 targets judged on the busy guest's row at the headline size.
BUSY_TARGETS: tuple[str, ...] = ("fault_p50_ratio", "fault_p99_ratio", "stall_p50_us", "stall_max_us", "stream_ratio")


def issue9_targets(rows: Mapping[str, Mapping], head_rounds: Sequence[Mapping], head: int, results: Mapping,
                   quick: bool, rss_runs: Mapping[str, Sequence[float]]) -> dict[str, dict]:
    """Issue 9's targets: each figure at the headline size and run by run (``evaluate``).

    ``results`` holds the headline figures already computed (downtime, worst RSS, floors).
    """
    busy, idle, qemu = (rows.get(f"{s}/{head}", {}) for s in ("busy", "idle", "qemu"))
    busy_runs, qemu_runs, idle_runs = (runs_of(head_rounds, [s]) for s in ("busy", "qemu", "idle"))
    values = {
        **{k: busy.get(k) for k in BUSY_TARGETS},
        "idle_stream_gbps": idle.get("stream_gbps"),
        "qemu_stream_gbps": qemu.get("stream_gbps"), "qemu_stall_total_ms": qemu.get("stall_total_ms"),
        "downtime_ms": results["downtime_ms"],
        "rss_over_guest_mib_src": results["rss_over_guest_mib"]["src"],
        "rss_over_guest_mib_dst": results["rss_over_guest_mib"]["dst"],
    }
    per_run = {
        "fault_p50_ratio": busy.get("fault_p50_ratio_by_round", []),
        "fault_p99_ratio": busy.get("fault_p99_ratio_by_round", []),
        "stall_p50_us": [x["stall_p50_us"] for x in busy_runs],
        "stall_max_us": [x["stall_max_us"] for x in busy_runs],
        "stream_ratio": busy.get("stream_ratio_by_round", []),
        "idle_stream_gbps": [x["stream_gbps"] for x in idle_runs],
        "qemu_stream_gbps": [x["stream_gbps"] for x in qemu_runs],
        "qemu_stall_total_ms": [x["stall_total_ms"] for x in qemu_runs],
        "downtime_ms": results["downtime_runs_ms"],
        "rss_over_guest_mib_src": rss_runs["src"], "rss_over_guest_mib_dst": rss_runs["dst"],
    }
    notes = {"downtime_ms": results["downtime_basis"]}
    if quick:
        notes.update({k: f"--quick: {head} MiB guests" for k in
                      (*BUSY_TARGETS, "idle_stream_gbps", "qemu_stream_gbps", "qemu_stall_total_ms")})
    return evaluate(values, per_run, results["floors"]["placer_unloaded_gbps"], notes)


def tls_section(head_rounds: Sequence[Mapping], head: int, quick: bool) -> dict:
    """TLS against its plaintext twins, round by round, at the headline size (issue 13), with the worst RSS."""
    notes = {k: f"--quick: {head} MiB guests" for k in ("stream_ratio", "stall_p50_delta_us")} if quick else {}
    tls = tls_summary(head_rounds, notes)
    tls["guest_mib"] = head
    tls_runs = runs_of(head_rounds, TLS_TWINS)
    tls["rss_over_guest_mib"] = {side: max(worst(tls_runs, f"rss_over_guest_mib_{side}"), default=None)
                                 for side in ("src", "dst")}
    return tls


def scaling(rows: Mapping[str, Mapping], refs: Mapping[str, Mapping], sizes: Sequence[int]) -> dict | None:
    """For information: s/GiB of the idle guest at the largest size over the smallest, and the same for
    the unloaded C placer on this machine; None with a single size."""
    if len(sizes) < 2:
        return None
    lo, hi = min(sizes), max(sizes)
    ours = ratio(rows.get(f"idle/{hi}", {}).get("total_s_per_gib"),
                 rows.get(f"idle/{lo}", {}).get("total_s_per_gib"))
    placer = ratio(refs.get(str(lo), {}).get("placer_unloaded", {}).get("gbps"),
                   refs.get(str(hi), {}).get("placer_unloaded", {}).get("gbps"))
    return {
        "sizes_mib": [lo, hi],
        "idle_s_per_gib_growth": ours - 1 if ours is not None else None,
        "placer_s_per_gib_growth": placer - 1 if placer is not None else None,
        "beyond_placer": ours / placer - 1 if ours is not None and placer else None,
    }


def compute(results: dict, blocks: Mapping[int, Sequence[Mapping]], head: int, quick: bool,
            loads: Mapping[str, str], vcpus: int) -> None:
    """Fills ``results`` (results.json) from the rounds of every size: scenario rows, references,
    the headline figures, issue 9's targets, TLS against plaintext and the scaling.

    Args:
        blocks: guest MiB -> that size's rounds (as ``scenario_rows`` takes them).
        head: the headline size; ``quick``: --quick (noted on the targets).
        loads: scenario -> its references' load, in the order of the rows.
        vcpus: the guests' vCPUs, as many as the same-load references' spinners.
    """
    rows, refs = {}, {}
    for mib, rounds in blocks.items():
        rows.update(scenario_rows(rounds, mib, loads))
        refs[str(mib)] = ref_summary(rounds)
    results["scenarios"] = rows
    results["refs"]["by_size"] = refs
    results["floors"] = floors(refs.get(str(head), {}), vcpus)
    busy, qemu = rows.get(f"busy/{head}", {}), rows.get(f"qemu/{head}", {})
    # Issue 9's figures are the plaintext data plane's: the TLS twins have their own section.
    plain = [s for s in loads if s not in TLS_TWINS]
    head_rounds = blocks.get(head, [])
    all_runs = [x for rounds in blocks.values() for x in runs_of(rounds, plain)]
    downtimes = [x["downtime_ms"] for x in runs_of(head_rounds, plain)]
    results["downtime_runs_ms"] = downtimes
    results["downtime_ms"] = median(downtimes)
    results["downtime_basis"] = f"median of {len(downtimes)} runs, every plaintext scenario at {head} MiB"
    for k in ("stream_ratio", "fault_p50_ratio", "fault_p99_ratio", "stall_p50_us", "stall_max_us"):
        results[k] = busy.get(k)
    results["qemu_load"] = {"stream_gbps": qemu.get("stream_gbps"), "stall_total_ms": qemu.get("stall_total_ms"),
                            "stall_p50_us": qemu.get("stall_p50_us"), "stall_p99_us": qemu.get("stall_p99_us"),
                            "guest_mib": head, "runs": qemu.get("runs")}
    rss_runs = {side: worst(all_runs, f"rss_over_guest_mib_{side}") for side in ("src", "dst")}
    results["rss_over_guest_mib"] = {side: max(v, default=None) for side, v in rss_runs.items()}
    results["total_s_per_gib"] = {k: v.get("total_s_per_gib") for k, v in rows.items()}
    results["targets"] = issue9_targets(rows, head_rounds, head, results, quick, rss_runs)
    if any(t in r["runs"] for r in head_rounds for t in TLS_TWINS):
        results["tls"] = {**results.get("tls", {}), **tls_section(head_rounds, head, quick)}
    sc = scaling(rows, refs, sorted(blocks))
    if sc is not None:
        results["scaling"] = sc


# -- memory kinds (issue 22) ----------------------------------------------------------------------

# The guest memory kinds (migrate-src --memory) and the guests measured on each: the busy guest
# (the demo's: uniform, flat out) and QEMU's load.  anon is today's memory, the one the others are
# compared with in the same round.
MEMORY_KINDS: tuple[str, ...] = ("anon", "memfd", "hugetlb")
MEMORY_SCENARIOS: tuple[str, ...] = ("busy", "qemu")
# A kind's page: what a fault asks for and a placement places (the wire page).
MEMORY_PAGE_KIB: dict[str, int] = {"anon": 4, "memfd": 4, "hugetlb": 2048}
# Figures of a kind compared with anon's, run by run in the same round: what 2 MiB pages buy.
VS_ANON: tuple[str, ...] = ("faults", "stall_total_ms", "total_s")


def memory_key(kind: str, name: str) -> str:
    """The key of a kind's run or reference in a memory round: "hugetlb:busy", "memfd:placer_same"."""
    return f"{kind}:{name}"


def memory_targets() -> list[Target]:
    """The targets of issue 22, for every memory kind, against references of the kind's page and memory."""
    return [
        Target("stream_ratio", ">=", 0.9, "busy: stream / same-load C placer of the same page size and memory"),
        Target("fault_p50_ratio", "<=", 2, "busy: vCPU stall p50 / same-load C fault floor moving the same page"),
        Target("downtime_ms", "<=", 1, "downtime, median of the kind's runs, ms"),
    ]


def memory_row(rounds: Sequence[Mapping], kind: str, scenario: str) -> dict | None:
    """One kind's scenario over the rounds: medians, ratios to the kind's own references round by round,
    and faults, total stall and total time against anon's run of the same scenario in the same round."""
    key = memory_key(kind, scenario)
    have = [r for r in rounds if key in r["runs"]]
    if not have:
        return None
    row = combine([r["runs"][key] for r in have])
    placer, floor = memory_key(kind, "placer_same"), memory_key(kind, "floor_same")
    ratios = {
        "stream_ratio": paired_ratios(pick(have, lambda r: r["runs"][key]["stream_gbps"]),
                                      pick(have, lambda r: r["refs"][placer]["placer_gbps"])),
        "fault_p50_ratio": paired_ratios(pick(have, lambda r: r["runs"][key]["stall_p50_us"]),
                                         pick(have, lambda r: r["refs"][floor]["fault_loaded_us"]["p50"])),
        "fault_p99_ratio": paired_ratios(pick(have, lambda r: r["runs"][key]["stall_p99_us"]),
                                         pick(have, lambda r: r["refs"][floor]["fault_loaded_us"]["p99"])),
    }
    anon = memory_key("anon", scenario)
    for f in VS_ANON:
        ratios[f"{f}_vs_anon"] = paired_ratios(pick(have, lambda r: r["runs"][key][f]),
                                               pick(have, lambda r: r["runs"][anon][f]))
    for k, v in ratios.items():
        row[k] = _r(median(v))
        row[f"{k}_by_round"] = _rounded(v)
    row["downtime_runs_ms"] = [r["runs"][key]["downtime_ms"] for r in have]
    return row


def memory_refs(rounds: Sequence[Mapping], kind: str) -> dict:
    """A kind's same-load references over the rounds: the placer's GB/s and the fault floor with a stream."""
    placer, floor = memory_key(kind, "placer_same"), memory_key(kind, "floor_same")
    gbps = pick(rounds, lambda r: r["refs"][placer]["placer_gbps"])
    got = [r["refs"][floor] for r in rounds if floor in r["refs"]]
    return {"placer_gbps": median(gbps), "placer_gbps_by_round": gbps,
            "floor_us": fault_floor(got, "fault_loaded_us") if got else None,
            "floor_link_idle_us": fault_floor(got, "fault_idle_us") if got else None,
            "floor_by_round_p50_us": [g["fault_loaded_us"]["p50"] for g in got],
            "floor_by_round_p99_us": [g["fault_loaded_us"]["p99"] for g in got]}


def memory_section(rounds: Sequence[Mapping], mib: int, kinds: Sequence[str] = MEMORY_KINDS,
                   quick: bool = False) -> dict:
    """results.json's ``memory``: every kind's busy and QEMU-load guests against its own references.

    ``rounds``: {"refs": {memory_key(kind, "placer_same" | "floor_same"): reference JSON},
    "runs": {memory_key(kind, scenario): summary}} each.  A kind's headline figures (``stream_ratio``,
    ``fault_p50_ratio``, ``fault_p99_ratio``, the stall p50/p99 and the floor's) are its busy guest's,
    as issue 9's are; ``downtime_ms`` and the RSS beyond the guest take every run of the kind.
    """
    out: dict[str, object] = {"guest_mib": mib, "rounds": len(rounds),
                              "kinds": [k for k in kinds if any(memory_key(k, s) in r["runs"]
                                                                for r in rounds for s in MEMORY_SCENARIOS)]}
    notes = {k: f"--quick: {mib} MiB guests" for k in ("stream_ratio", "fault_p50_ratio")} if quick else {}
    for kind in kinds:
        rows = {s: row for s in MEMORY_SCENARIOS if (row := memory_row(rounds, kind, s)) is not None}
        if not rows:
            continue
        refs = memory_refs(rounds, kind)
        busy = rows.get("busy", {})
        runs = runs_of(rounds, [memory_key(kind, s) for s in MEMORY_SCENARIOS])
        downtimes = worst(runs, "downtime_ms")
        entry: dict[str, object] = {
            "page_kib": MEMORY_PAGE_KIB.get(kind),
            "stream_ratio": busy.get("stream_ratio"), "fault_p50_ratio": busy.get("fault_p50_ratio"),
            "fault_p99_ratio": busy.get("fault_p99_ratio"),
            "stall_p50_us": busy.get("stall_p50_us"), "stall_p99_us": busy.get("stall_p99_us"),
            "floor_p50_us": (refs["floor_us"] or {}).get("p50"), "floor_p99_us": (refs["floor_us"] or {}).get("p99"),
            "placer_gbps": refs["placer_gbps"], "stream_gbps": busy.get("stream_gbps"),
            "downtime_ms": median(downtimes), "downtime_runs_ms": downtimes,
            "rss_over_guest_mib": {side: max(worst(runs, f"rss_over_guest_mib_{side}"), default=None)
                                   for side in ("src", "dst")},
            "verified": all(r.get("verified") for r in runs) if runs else None,
            "refs": refs, "scenarios": rows,
        }
        values = {t: entry[t] for t in ("stream_ratio", "fault_p50_ratio", "downtime_ms")}
        per_run = {"stream_ratio": busy.get("stream_ratio_by_round", []),
                   "fault_p50_ratio": busy.get("fault_p50_ratio_by_round", []), "downtime_ms": downtimes}
        entry["targets"] = evaluate(values, per_run, None, notes, memory_targets())
        out[kind] = entry
    return out


# -- tables ----------------------------------------------------------------------------------------

def fmt(v: object, nd: int = 2, missing: str = "-", sci_from: float | None = 1e5) -> str:
    """A figure as a table cell: ``missing`` for None, yes/NO, floats to ``nd`` places (3 significant
    digits from ``sci_from`` on, if given), anything else as str()."""
    if v is None:
        return missing
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if sci_from is None or abs(v) < sci_from else f"{v:.3g}"
    return str(v)


# -- what the commands and tools print -------------------------------------------------------------

def listening_address(line: str) -> str | None:
    """The address in migrate-src's ``{"listening": "host:port"}`` stdout line; None for any other line."""
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg.get("listening") if isinstance(msg, dict) else None


def openssl_speed_gbps(text: str) -> float | None:
    """GB/s from ``openssl speed -mr -bytes N`` output (its ``+F:...:bytes_per_s`` line); None without one."""
    out = None
    for line in text.splitlines():
        if line.startswith("+F:"):
            out = round(float(line.rsplit(":", 1)[1]) / 1e9, 2)
    return out


# -- scripts/bench-modes: postcopy, hybrid and precopy side by side ---------------------------------

# The runs repeated on the hotset guest, medians reported (bench/modebench.py's REPEATED).
MODE_MEDIANS: tuple[str, ...] = ("faults", "stall_ms", "total_s", "downtime_ms")
QEMU_MODES = {"postcopy": "total 1.1-1.5 s, downtime 3-5 ms (preempt)",
              "precopy": "total 3.5-3.8 s, downtime 151-160 ms"}


def mode_figures(src: Mapping, dst: Mapping) -> dict:
    """The figures one migration of the modes bench is judged by, from both sides' metrics."""
    return {
        "total_s": src["migration_s"], "precopy_s": src["precopy_s"], "downtime_ms": dst["downtime_ms"],
        "bytes_sent": src["bytes_sent_total"], "faults": dst["faults"], "stall_ms": dst["vcpu_stall_us"]["total_ms"],
        "rounds": len(src["rounds"]), "dirty_at_switchover": src["switchover"]["dirty_pages"],
        "progress": src["guest_steps_per_s"]["ratio"], "working_set_pages": src["switchover"]["working_set_pages"],
        "verified": dst["verified"], "round_dirty": [r["dirty_pages_found"] for r in src["rounds"]],
        "source_switch_ms": src["switchover"]["stopped_to_cpu_state_ms"],
    }


def rotated(items: Sequence, i: int) -> list:
    """``items`` starting at i (modulo its length): repetition i's order, so no item always comes first."""
    k = i % len(items)
    return [*items[k:], *items[:k]]


def repeated_row(runs: Sequence[Mapping], load: str, variant: str) -> dict:
    """One (load, variant) of the repeated runs: medians, each run's faults, the working set of the first."""
    return {"load": load, "variant": variant, "runs": len(runs),
            **{k: statistics.median(r[k] for r in runs) for k in MODE_MEDIANS},
            "each": ", ".join(str(r["faults"]) for r in runs), "ws": runs[0]["working_set_pages"]}


def mode_targets(modes: Sequence[Mapping], rows: Mapping[tuple[str, str], Mapping]) -> list[tuple[str, str, bool]]:
    """The modes' targets: (what, the figures measured, met).

    ``modes``: one run per (load, mode) ({"load", "mode", figures}); ``rows``: ``repeated_row`` by
    (load, variant), with the busy hotset guest's "postcopy, address", "postcopy, working-set" and "hybrid".
    """
    def get(load: str, mode: str) -> Mapping:
        return next(r for r in modes if r["load"] == load and r["mode"] == mode)

    q_post, q_hyb, q_pre = get("qemu", "postcopy"), get("qemu", "hybrid"), get("qemu", "precopy")
    addr, ws = rows["busy hotset", "postcopy, address"], rows["busy hotset", "postcopy, working-set"]
    h_hyb = rows["busy hotset", "hybrid"]
    return [
        ("qemu: hybrid faults after switchover <= 10% of postcopy's",
         f"{q_hyb['faults']} vs {q_post['faults']}", q_hyb["faults"] <= 0.1 * q_post["faults"]),
        ("qemu: hybrid total vCPU stall <= 10% of postcopy's",
         f"{q_hyb['stall_ms']:.1f} vs {q_post['stall_ms']:.1f} ms", q_hyb["stall_ms"] <= 0.1 * q_post["stall_ms"]),
        ("qemu: hybrid downtime <= 1 ms", f"{q_hyb['downtime_ms']:.1f} ms (postcopy {q_post['downtime_ms']:.1f})",
         q_hyb["downtime_ms"] <= 1),
        ("busy hotset: hybrid total stall no worse than postcopy's",
         f"{h_hyb['stall_ms']:.1f} vs {addr['stall_ms']:.1f} ms (medians)", h_hyb["stall_ms"] <= addr["stall_ms"]),
        ("busy hotset postcopy: working-set faults <= 50% of address order's",
         f"{ws['faults']} vs {addr['faults']} (medians)", ws["faults"] <= 0.5 * addr["faults"]),
        ("qemu: precopy downtime well under QEMU's 160 ms",
         f"{q_pre['downtime_ms']:.1f} ms, total {q_pre['total_s']:.2f} s (QEMU precopy: {QEMU_MODES['precopy']})",
         q_pre["downtime_ms"] < 160 / 4),
    ]
