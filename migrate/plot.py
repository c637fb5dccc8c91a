"""Draws one migration from migrate-dst's metrics file: pages placed over time, and the stall CDF.

    python -m migrate.plot METRICS.json OUT.png

Left: pages placed since switchover, by the bulk stream and by the urgent
(fault) path when the metrics tell them apart.  Right: the cumulative
distribution of the vCPUs' stalls (accesses that waited for a page), from
the stall histogram the metrics carry.  matplotlib is an optional extra
(``pip install 'uffd-migrate[plot]'``); ``scripts/demo --plot`` installs it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

Series = list[tuple[float, float]]


def timelines(metrics: dict[str, Any]) -> dict[str, Series]:
    """Pages placed over time, by path.

    ``placed_timeline`` entries are ``[t, bulk, urgent]`` (pages placed by
    each path so far) or, from older destinations, ``[t, placed]``.

    Returns:
        ``{"bulk": ..., "urgent": ..., "placed": ...}`` for the first shape
        (placed: their sum), ``{"placed": ...}`` for the second, ``{}`` when
        there is no timeline.  ``placed`` ends at the end of the migration
        (``total_s``, ``pages_placed``): samples come every 0.1 s, and a
        small guest arrives faster than that.
    """
    rows = [row for row in metrics.get("placed_timeline") or [] if isinstance(row, (list, tuple)) and len(row) >= 2]
    if not rows:
        return {}
    out: dict[str, Series] = {}
    if all(len(row) >= 3 for row in rows):
        out["bulk"] = [(float(r[0]), float(r[1])) for r in rows]
        out["urgent"] = [(float(r[0]), float(r[2])) for r in rows]
        out["placed"] = [(float(r[0]), float(r[1]) + float(r[2])) for r in rows]
    else:
        out["placed"] = [(float(r[0]), float(r[1])) for r in rows]
    end, placed = metrics.get("total_s"), metrics.get("pages_placed")
    if end is not None and placed is not None and float(end) > out["placed"][-1][0]:
        out["placed"].append((float(end), float(placed)))
    return out


def stall_cdf(metrics: dict[str, Any]) -> Series:
    """(stall µs, fraction of stalls at most that long), from the stall histogram in the metrics.

    Uses the fine histogram (``vcpu_stall_us.hist``, about 12% wide buckets)
    and falls back to QEMU's doubling buckets (``qemu_dist``); each point is a
    bucket's upper edge, so the curve is exact at every point it shows.
    """
    stall = metrics.get("vcpu_stall_us") or {}
    if stall.get("hist"):
        buckets = [(float(upper), int(n)) for upper, n in stall["hist"]]
    elif stall.get("qemu_dist"):
        buckets = [(float(2 ** (i + 1)), int(n)) for i, n in enumerate(stall["qemu_dist"]) if n]
    else:
        return []
    total = sum(n for _, n in buckets)
    out, seen = [], 0
    for upper, n in sorted(buckets):
        seen += n
        out.append((upper, seen / total))
    return out


def draw(metrics: dict[str, Any], out: str) -> None:
    """Writes the two plots to ``out`` (PNG).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = timelines(metrics)
    marker = "." if len(series.get("placed", [])) < 20 else None  # a fast migration has few samples
    if "bulk" in series:
        left.plot(*zip(*series["placed"]), label="all", color="grey", marker=marker)
        left.plot(*zip(*series["bulk"]), label="bulk stream", color="tab:blue", marker=marker)
        urgent = left.twinx()  # the urgent path places far fewer pages: its own scale
        urgent.plot(*zip(*series["urgent"]), label="urgent (faults, right)", color="tab:red", marker=marker)
        urgent.set_ylabel("pages placed on request", color="tab:red")
        left.legend(handles=left.lines + urgent.lines, loc="lower right", fontsize=8)
    elif "placed" in series:
        left.plot(*zip(*series["placed"]), label="placed (bulk + urgent)", color="tab:blue", marker=marker)
        left.legend(loc="lower right", fontsize=8)
    else:
        left.text(0.5, 0.5, "no timeline in these metrics", ha="center", transform=left.transAxes)
    total = metrics.get("pages_total")
    if total:
        left.axhline(total, color="grey", linestyle=":", linewidth=1)
    left.set(xlabel="seconds since switchover", ylabel="pages placed", title="memory arriving")

    cdf = stall_cdf(metrics)
    stall = metrics.get("vcpu_stall_us") or {}
    if cdf:
        right.step([x for x, _ in cdf], [y for _, y in cdf], where="post", color="tab:purple")
        right.set_xscale("log")
        for q in ("p50", "p99"):
            if stall.get(q):
                right.axvline(stall[q], color="grey", linestyle=":", linewidth=1)
                right.text(stall[q], 0.02, f" {q} {stall[q]:.0f} µs", fontsize=8, rotation=90, va="bottom")
    else:
        right.text(0.5, 0.5, "no stalls", ha="center", transform=right.transAxes)
    right.set(xlabel="vCPU stall (µs, log)", ylabel="fraction of stalls", ylim=(0, 1.02),
              title=f"vCPU stalls ({stall.get('count', 0)} accesses waited for a page)")

    heading = (f"{metrics.get('guest_mib', 0):.0f} MiB, {metrics.get('vcpus', '?')} vCPUs, "
               f"{metrics.get('workload', '?')}: downtime {metrics.get('downtime_ms') or 0:.1f} ms, "
               f"memory in {metrics.get('total_s', 0):.2f} s, {metrics.get('faults', 0)} faults")
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0].startswith("-"):
        print("usage: python -m migrate.plot METRICS.json OUT.png", file=sys.stderr)
        return 2
    src, out = args
    try:
        with open(src) as f:
            metrics = json.load(f)
    except OSError as exc:
        print(f"migrate.plot: error: cannot read {src}: {exc.strerror}", file=sys.stderr)
        print("migrate.plot: hint: write one with migrate-dst --metrics PATH", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"migrate.plot: error: {src} is not JSON ({exc.msg} at line {exc.lineno})", file=sys.stderr)
        print("migrate.plot: hint: give the file migrate-dst --metrics wrote", file=sys.stderr)
        return 1
    try:
        draw(metrics, out)
    except ImportError:
        print("migrate.plot: error: matplotlib is not installed", file=sys.stderr)
        print("migrate.plot: hint: pip install 'uffd-migrate[plot]' (scripts/demo --plot does it)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"migrate.plot: error: cannot write {out}: {exc.strerror}", file=sys.stderr)
        print("migrate.plot: hint: give a path in a writable folder", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
