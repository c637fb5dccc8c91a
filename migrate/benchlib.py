"""The arithmetic of ``scripts/bench``: per-run figures, medians, paired ratios, targets.

Pure functions of the metrics the commands write and of the C references'
JSON, with no I/O and nothing beyond the standard library, so that
``scripts/bench`` can import it before the project is installed and the tests
can check it without starting a process.

The bench interleaves: each round runs a C reference, then the migration it is
compared with, then the next reference, and so on, so a reference and its
migration see the same machine.  A ratio is therefore taken per round (the
migration over the reference run next to it) and the rounds' ratios are
summarized by their median; every other figure is the median over rounds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from .protocol import PAGE_SIZE

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
        "guest_gbps": round(pages * PAGE_SIZE / total / 1e9, 3) if pages and total else None,
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
        "rss_over_guest_mib_src": round(src["rss_mib"] - mib, 1) if src.get("rss_mib") is not None else None,
        "rss_over_guest_mib_dst": round(dst["rss_mib"] - mib, 1) if dst.get("rss_mib") is not None else None,
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
