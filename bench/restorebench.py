"""The restore bench: a snapshot restored through Firecracker's userfaultfd handoff, ours against the floor.

``scripts/bench-restore`` runs it.  For each guest size and load it saves one
snapshot (``migrate-snapshot``: a busy guest, 2 vCPUs, flat out), keeps its
memory file in the page cache, and restores it again and again in the VMM
stand-in (``migrate-vmm``), whose vCPUs run the same load from the snapshot's
CPU state, in interleaved rounds (the order rotates each round) against:

- ``floor``: ``bench/ref/file_handler.c ondemand``, Firecracker's model of
  serving a local file (its example ``on_demand`` handler): it takes the
  VMM's userfaultfd over the Unix socket exactly as ``migrate-dst --handoff``
  does and copies each faulting page from the memory file with
  ``UFFDIO_COPY``: no stream, no network.  The floor of the fault path (time
  to the first vCPU step, stall, faults).
- ``floor-all``: the same program, ``all`` (Firecracker's ``fault_all``
  handler): the first fault copies the whole memory file in.  The floor of
  "every page present" and of a stream's rate.
- ``ours``: ``migrate-dst --handoff`` filling the VMM from ``migrate-src
  --memory-file`` over loopback TCP (faults on demand, the rest streamed).

and, with ``--wan RATE,RTT`` (root), ``ours`` again over the emulated link of
``bench/wan.py``: the source in the link's source namespace, the handler and
the VMM on the other side.

Figures per run: the VMM's ``first_step_ms`` (the handoff message sent →
the first vCPU's first access done) and its vCPU stalls; the handler's
faults; "all present", the handoff → the last page placed (ours: the VMM's
log line as it sends the message to the handler's "all pages placed", both
JSON log lines on this machine's clock; the floor: its own clock from the
message received); the stream's GB/s (ours: the bulk channel's bytes over
the postcopy; floor-all: the copy of the whole file).  Ratios are ours over
the floor of the same round, median over rounds.  Results go into
``bench/results.json`` under ``restore``.  It reports, it never asserts.

    scripts/bench-restore [--quick] [--mib 1024 256] [--workloads hotset sequential] [--rounds 3]
                          [--wan 1Gbit,1ms | --no-wan] [--python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
RESULTS = HERE / "results.json"
sys.path.insert(0, str(HERE))

VARIANTS = ("floor", "floor-all", "ours")
# How long the restored vCPUs run before they stop and the VMM proves the guest: long enough for the
# stream to end at 1 GiB on loopback, so the figures are of a restore under load, not of the proof.
RUN_S = 1.0


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def build_handler() -> Path:
    """Compiles bench/ref/file_handler.c into bench/build/ when it is newer than the binary."""
    exe, src = BUILD / "file_handler", HERE / "ref" / "file_handler.c"
    deps = [src, HERE / "ref" / "common.h"]
    if not exe.exists() or any(exe.stat().st_mtime < d.stat().st_mtime for d in deps):
        BUILD.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-Wall", "-pthread", f"-I{HERE}", "-o", str(exe),
                            str(src)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"compiling {src.name} failed:\n{r.stderr}")
    return exe


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _log_time(path: Path, starts: str) -> float:
    for rec in _json_lines(path):
        if rec.get("msg", "").startswith(starts):
            return rec["t"]
    raise RuntimeError(f"no log line starting {starts!r} in {path}")


def _wait_for(path: Path, procs: list[subprocess.Popen], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or (path.suffix != ".sock" and not path.read_text().strip()):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)


class Restorer:
    """Runs one restore of a snapshot in ``migrate-vmm`` against a handler; returns its figures."""

    def __init__(self, python: Path, handler: Path, work: Path, link: Any = None, run_s: float = RUN_S) -> None:
        self.bin = python.parent
        self.run_s = run_s
        self.handler = handler
        self.work = work
        self.link = link

    def _vmm(self, snap: Path, sock: Path, pre: list[str]) -> tuple[dict[str, Any], Path]:
        err = self.work / "vmm.err"
        with open(err, "w") as e:
            r = subprocess.run([*pre, str(self.bin / "migrate-vmm"), "--snapshot", str(snap), "--handoff", str(sock),
                                "--seconds", str(self.run_s), "--timeout", "60", "--metrics", str(self.work / "vmm.json"),
                                "--log-format", "json", "--no-progress"], stdout=subprocess.DEVNULL, stderr=e,
                               timeout=600)
        if r.returncode:
            raise RuntimeError(f"migrate-vmm exited {r.returncode}: {err.read_text()[-2000:]}")
        vmm = json.loads((self.work / "vmm.json").read_text())
        if not vmm["verified"]:
            raise RuntimeError("the restore did not verify")
        return vmm, err

    @staticmethod
    def _vmm_figures(vmm: dict[str, Any]) -> dict[str, Any]:
        s = vmm["vcpu_stall_us"]
        return {"first_step_ms": vmm["first_step_ms"], "stall_total_ms": s["total_ms"], "stall_count": s["count"],
                "stall_p50_us": s["p50"], "stall_p99_us": s["p99"], "stall_max_us": s["max"],
                "steps_run": vmm["steps_run"], "verified": vmm["verified"]}

    def floor(self, snap: Path, mode: str) -> dict[str, Any]:
        """The C handler (``ondemand`` or ``all``) serving the memory file to the VMM."""
        sock = self.work / "floor.sock"
        sock.unlink(missing_ok=True)
        with open(self.work / "floor.out", "w") as out, open(self.work / "floor.err", "w") as err:
            h = subprocess.Popen([str(self.handler), str(sock), str(snap / "memory"), mode], stdout=out, stderr=err)
        try:
            _wait_for(sock, [h], "file_handler")
            vmm, _ = self._vmm(snap, sock, [])
            if h.wait(timeout=60) != 0:
                raise RuntimeError(f"file_handler exited {h.returncode}: {(self.work / 'floor.err').read_text()}")
        finally:
            if h.poll() is None:
                h.kill()
                h.wait()
        fh = _json_lines(self.work / "floor.out")[-1]
        return {**self._vmm_figures(vmm), "faults": fh["faults"], "all_present_s": fh["all_present_s"],
                "stream_gbps": fh["all_copy_gbps"] if mode == "all" else None,
                "service_p50_us": fh["service_us"]["p50"], "eexist": fh["eexist"]}

    def ours(self, snap: Path) -> dict[str, Any]:
        """migrate-src --memory-file and migrate-dst --handoff (over the link when there is one)."""
        w = self.work
        for f in ("ready", "src.json", "dst.json", "vmm.sock"):
            (w / f).unlink(missing_ok=True)
        link = self.link
        host = link.src_addr if link else "127.0.0.1"
        pre_src, pre_dst = (link.exec_in("src"), link.exec_in("dst")) if link else ([], [])
        key = w / "key"
        key.write_text(secrets.token_hex(32))
        common = ["--key-file", str(key), "--no-progress"]
        procs: list[subprocess.Popen] = []
        try:
            with open(w / "src.err", "w") as se, open(w / "dst.err", "w") as de:
                src = subprocess.Popen([*pre_src, str(self.bin / "migrate-src"), "--memory-file", str(snap / "memory"),
                                        "--listen", f"{host}:0", "--ready-file", str(w / "ready"), "--metrics",
                                        str(w / "src.json"), *common, "-q"], stdout=subprocess.DEVNULL, stderr=se)
                procs.append(src)
                _wait_for(w / "ready", procs, "migrate-src")
                dst = subprocess.Popen([*pre_dst, str(self.bin / "migrate-dst"), "--connect",
                                        (w / "ready").read_text().strip(), "--handoff", str(w / "vmm.sock"),
                                        "--metrics", str(w / "dst.json"), "--log-format", "json", *common],
                                       stdout=subprocess.DEVNULL, stderr=de)
                procs.append(dst)
                _wait_for(w / "vmm.sock", procs, "migrate-dst --handoff")
                vmm, vmm_err = self._vmm(snap, w / "vmm.sock", [])
                for p, name in ((dst, "migrate-dst"), (src, "migrate-src")):
                    if p.wait(timeout=120) != 0:
                        raise RuntimeError(f"{name} exited {p.returncode}: "
                                           f"{(w / ('dst.err' if p is dst else 'src.err')).read_text()[-2000:]}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
        dst_m = json.loads((w / "dst.json").read_text())
        handed = _log_time(vmm_err, "handed ")
        placed = _log_time(w / "dst.err", "all ")
        return {**self._vmm_figures(vmm), "faults": dst_m["faults"], "requests": dst_m["requests"],
                "all_present_s": round(placed - handed, 4), "stream_gbps": dst_m["stream_gbps"],
                "postcopy_s": dst_m["total_s"], "service_p50_us": dst_m["fault_service_us"]["p50"],
                "eexist": dst_m["eexist"]}


def snapshot(python: Path, out: Path, mib: int, workload: str) -> Path:
    """A snapshot of a busy guest (2 vCPUs, flat out, 1 s), its memory file read once into the page cache."""
    r = subprocess.run([str(python.parent / "migrate-snapshot"), str(out), "--guest-mib", str(mib), "--vcpus", "2",
                        "--workload", workload, "--seconds", "1", "-q"], capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(f"migrate-snapshot failed: {r.stderr[-2000:]}")
    with open(out / "memory", "rb") as f:  # warm: both handlers read it from the page cache
        while f.read(1 << 24):
            pass
    return out


# ---------------------------------------------------------------- the report

FIGURES = [("first vCPU step ms", "first_step_ms", 2), ("stall total ms", "stall_total_ms", 0),
           ("stall p50 µs", "stall_p50_us", 0), ("stall p99 µs", "stall_p99_us", 0), ("faults", "faults", 0),
           ("all present s", "all_present_s", 3), ("stream GB/s", "stream_gbps", 2)]
# Which floor each of ours is compared with: the fault path with the on-demand handler, "every page
# present" and the stream's rate with the handler that copies the whole file at once.
RATIO_AGAINST = {"first_step_ms": "floor", "stall_total_ms": "floor", "stall_p50_us": "floor", "faults": "floor",
                 "all_present_s": "floor-all", "stream_gbps": "floor-all"}


def _median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (MiB, workload, variant), and for ``ours`` the medians of its per-round ratios to the floors."""
    rows = []
    keys = sorted({(r["mib"], r["workload"]) for r in runs}, key=lambda k: (-k[0], k[1]))
    variants = list(VARIANTS) + sorted({r["variant"] for r in runs} - set(VARIANTS))
    for mib, workload in keys:
        mine = [r for r in runs if r["mib"] == mib and r["workload"] == workload]
        for variant in variants:
            vr = [r for r in mine if r["variant"] == variant]
            if not vr:
                continue
            row: dict[str, Any] = {"mib": mib, "workload": workload, "variant": variant, "runs": len(vr)}
            for _, key, _ in FIGURES:
                row[key] = _median([r.get(key) for r in vr])
            if variant.startswith("ours"):
                for key, against in RATIO_AGAINST.items():
                    ratios = []
                    for r in vr:
                        ref = [f for f in mine if f["variant"] == against and f["round"] == r["round"]]
                        if ref and r.get(key) and ref[0].get(key):
                            ratios.append(r[key] / ref[0][key])
                    row[f"x_{key}"] = round(_median(ratios), 2) if ratios else None
            rows.append(row)
    return rows


def _fmt(v: Any, nd: int) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if nd else f"{v:.0f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["MiB", "load", "handler", *[h for h, _, _ in FIGURES]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["mib"]), r["workload"], r["variant"]]
        for _, key, nd in FIGURES:
            cell = _fmt(r[key], nd)
            x = r.get(f"x_{key}")
            if x is not None:
                cell += f" (×{x:.2f})"
            cells.append(cell)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def link_goodput(link: Any) -> float:
    """GB/s of bench/ref/tcp_bulk.c through the link, best of two 2 s runs: what the link can carry."""
    from linkbench import _json_out, build_tools

    tcp_bulk = build_tools()["tcp_bulk"]
    runs = [_json_out([str(tcp_bulk), str(round(link.spec.bytes_per_s * 2)), link.netns_path("src"),
                       link.netns_path("dst"), link.dst_addr], timeout=120) for _ in range(2)]
    return max(r["tcp_gbps"] for r in runs)


def against_link(rows: list[dict[str, Any]], gbps: float | None) -> list[dict[str, Any]]:
    """Each restore over the link beside the link's own floor: the guest's bytes at tcp_bulk's goodput."""
    if not gbps:
        return []
    out = []
    for r in rows:
        if r["variant"].startswith("ours over"):
            floor_s = r["mib"] * 2**20 / (gbps * 1e9)
            out.append({"mib": r["mib"], "workload": r["workload"], "variant": r["variant"],
                        "all_present_s": r["all_present_s"], "link_floor_s": round(floor_s, 3),
                        "x_all_present": round(r["all_present_s"] / floor_s, 2) if r["all_present_s"] else None,
                        "stream_gbps": r["stream_gbps"],
                        "x_stream": round(r["stream_gbps"] / gbps, 2) if r["stream_gbps"] else None})
    return out


def link_table(rows: list[dict[str, Any]]) -> str:
    out = ["| MiB | load | all present s | the guest at tcp_bulk's goodput s | × | stream GB/s | × goodput |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['mib']} | {r['workload']} | {_fmt(r['all_present_s'], 3)} | {r['link_floor_s']:.3f} | "
                   f"{_fmt(r['x_all_present'], 2)} | {_fmt(r['stream_gbps'], 3)} | {_fmt(r['x_stream'], 2)} |")
    return "\n".join(out)


# ---------------------------------------------------------------- main

def _link(text: str) -> str:
    from wan import LinkSpec

    try:
        return LinkSpec.parse(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/bench-restore", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=_positive, nargs="+", metavar="MIB", default=[1024, 256], help="guest sizes in MiB (default 1024 256)")
    ap.add_argument("--workloads", nargs="+", metavar="LOAD", default=["hotset", "sequential"],
                    choices=["uniform", "hotset", "sequential", "readmostly"],
                    help="the guests' loads, flat out: uniform, hotset, sequential, readmostly (default hotset sequential)")
    ap.add_argument("--rounds", type=_positive, default=3, metavar="N", help="interleaved rounds of every handler (default 3)")
    ap.add_argument("--wan", type=_link, default="1Gbit,1ms", metavar="RATE,RTT",
                    help="also restore over this emulated link (bench/wan.py; root), RATE,RTT (default 1Gbit,1ms)")
    ap.add_argument("--no-wan", dest="wan", action="store_const", const=None, help="skip the emulated link")
    ap.add_argument("--wan-rounds", type=_positive, default=2, metavar="N", help="restores over the link per guest (default 2)")
    ap.add_argument("--run-seconds", type=float, default=RUN_S, metavar="S",
                    help=f"seconds the restored vCPUs run before the VMM stops them and proves the guest; the stall "
                         f"is measured over them (default {RUN_S:g})")
    ap.add_argument("--quick", action="store_true", help="256 MiB, hotset, 2 rounds, one restore over the link")
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), metavar="PATH",
                    help="interpreter of the venv where uffd-migrate is installed (default .venv)")
    return ap


def main() -> int:
    args = parser().parse_args()
    if args.quick:
        args.mib, args.workloads, args.rounds, args.wan_rounds = [256], ["hotset"], 2, 1
    python = Path(args.python)
    if not (python.parent / "migrate-vmm").exists():
        log(f"scripts/bench-restore: error: migrate-vmm is not installed next to {python}\n"
            "scripts/bench-restore: hint: run scripts/test, or pip install -e . in that venv")
        return 2
    handler = build_handler()
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    t0 = time.monotonic()
    result: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": rev.stdout.strip(),
                              "loadavg_start": os.getloadavg()[0], "vcpus": 2, "run_s": args.run_seconds, "rounds": args.rounds,
                              "wan": args.wan, "runs": []}
    runs = result["runs"]
    failed = 0

    def attempt(label: str, restore: Callable[[], dict[str, Any]], **where: Any) -> None:
        """One restore, its figures kept with ``where`` and logged under ``label``; a failure is counted."""
        nonlocal failed
        try:
            fig = restore()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            failed += 1
            log(f"  {where['variant']} failed: {str(exc).splitlines()[0]}")
            return
        fig.update(where)
        runs.append(fig)
        log(f"  {label}: first step {fig['first_step_ms']} ms, stall {fig['stall_total_ms']:.0f} ms, "
            f"{fig['faults']} faults, all present {fig['all_present_s']} s, stream {fig['stream_gbps']} GB/s")

    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
        work = Path(tmp)
        restorer = Restorer(python, handler, work, run_s=args.run_seconds)
        snaps = {}
        for mib in args.mib:
            for workload in args.workloads:
                log(f"snapshot: {mib} MiB {workload} ...")
                snaps[mib, workload] = snapshot(python, work / f"snap-{mib}-{workload}", mib, workload)
                # One untimed restore first: code, the page cache, memory the VM has not touched for a while.
                restorer.ours(snaps[mib, workload])
                for rnd in range(args.rounds):
                    order = VARIANTS[rnd % 3:] + VARIANTS[:rnd % 3]
                    for variant in order:
                        snap = snaps[mib, workload]
                        restore = (partial(restorer.ours, snap) if variant == "ours" else
                                   partial(restorer.floor, snap, variant.replace("floor-", "")
                                           if variant != "floor" else "ondemand"))
                        attempt(f"round {rnd + 1} {variant:9}", restore, mib=mib, workload=workload,
                                variant=variant, round=rnd)
        if args.wan:
            from wan import LinkSpec, LinkUnavailable, emulated_link
            try:
                with emulated_link(LinkSpec.parse(args.wan)) as link:
                    result["wan_tcp_gbps"] = link_goodput(link)
                    log(f"{link.spec.name}: tcp_bulk goodput {result['wan_tcp_gbps']:.3f} GB/s (best of 2)")
                    over = Restorer(python, handler, work, link, run_s=args.run_seconds)
                    name = f"ours over {link.spec.name}"
                    for (mib, workload), snap in snaps.items():
                        for rnd in range(args.wan_rounds):
                            attempt(f"{mib} MiB {workload} {name}", partial(over.ours, snap), mib=mib,
                                    workload=workload, variant=name, round=rnd)
            except LinkUnavailable as exc:
                log(f"the emulated link is not available here: {exc}")
                result["wan_error"] = str(exc)
    result["rows"] = summarize(runs)
    result["wan_rows"] = against_link(result["rows"], result.get("wan_tcp_gbps"))
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["loadavg_end"] = os.getloadavg()[0]
    whole = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    whole["restore"] = result
    RESULTS.write_text(json.dumps(whole, indent=2) + "\n")
    print(table(result["rows"]))
    if result["wan_rows"]:
        print(f"\nAgainst the link itself (tcp_bulk's goodput through it, {result['wan_tcp_gbps']:.3f} GB/s):\n")
        print(link_table(result["wan_rows"]))
    log(f"\nwrote {RESULTS.relative_to(ROOT)} (key restore) in {result['elapsed_s']} s; "
        f"load average {result['loadavg_start']:.1f} → {result['loadavg_end']:.1f}")
    return 1 if failed else 0
