"""The three migration modes side by side: postcopy, hybrid, precopy.

Migrates 1 GiB guests with 2 vCPUs with the installed migrate-src and
migrate-dst (.venv/bin, or --python's venv) on 127.0.0.1, in every mode, on
four loads, interleaved (mode by mode within each load, so that a busy
moment of this shared machine hits all three alike):

    idle     readmostly at 1 access/s per vCPU, no zero pages
    busy     uniform, flat out
    hotset   hotset (90% of accesses to 10% of memory), flat out
    qemu     uniform at 25,000 accesses/s per vCPU, 30% zero pages: the load
             QEMU's figures on this machine were taken with

then, --repeat times each, interleaved in a rotating order, medians: busy hotset in postcopy
with address order, postcopy with working-set order and hybrid; and a hotset
guest at 100,000 accesses/s per vCPU in postcopy with either order (where
the vCPUs are not stalled all the time, so the order of the first pages
shows).  Prints markdown tables and the issue's targets on stdout, writes
bench/modes.json.  It reports, it never asserts.

    scripts/bench-modes [--mib 1024] [--repeat 3] [--no-verify] [--python PATH]

This module runs the migrations and prints (scripts/bench-modes starts it
through bench/launcher.py, under the venv); the figures, medians and targets
are bench/benchlib.py's, tested by tests/test_bench.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import benchlib as bl  # noqa: E402  (bench/, beside this file)

RESULTS = HERE / "modes.json"
MODES = ("postcopy", "hybrid", "precopy")
LOADS = {
    "idle": ["--workload", "readmostly", "--rate", "1", "--zero-fraction", "0"],
    "busy": ["--workload", "uniform"],
    "hotset": ["--workload", "hotset"],
    "qemu": ["--workload", "uniform", "--rate", "25000", "--zero-fraction", "0.3"],
}
# Repeated, interleaved: (load, rate args, variant, mode/order args).
REPEATED = [
    ("busy hotset", [], "postcopy, address", ["--stream-order", "address"]),
    ("busy hotset", [], "postcopy, working-set", ["--stream-order", "working-set"]),
    ("busy hotset", [], "hybrid", ["--mode", "hybrid"]),
    ("hotset 100k/s", ["--rate", "100000"], "postcopy, address", ["--stream-order", "address"]),
    ("hotset 100k/s", ["--rate", "100000"], "postcopy, working-set", ["--stream-order", "working-set"]),
]
MODES_COLUMNS = [
    ("load", "load", 0), ("mode", "mode", 0), ("total s", "total_s", 2), ("of which precopy s", "precopy_s", 2),
    ("downtime ms", "downtime_ms", 1), ("MiB sent", "mib_sent", 0), ("faults", "faults", 0),
    ("vCPU stall ms", "stall_ms", 1), ("rounds", "rounds", 0), ("dirty at switchover", "dirty_at_switchover", 0),
    ("guest pace in rounds", "progress", 2), ("verified", "verified", 0)]
REPEATED_COLUMNS = [
    ("load", "load", 0), ("mode, stream order", "variant", 0), ("faults", "faults", 0),
    ("faults, each run", "each", 0), ("vCPU stall ms", "stall_ms", 1), ("total s", "total_s", 2),
    ("downtime ms", "downtime_ms", 1), ("working-set pages", "ws", 0)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_ready(src: subprocess.Popen, ready: Path, src_err: Path) -> str:
    """The address migrate-src writes to its --ready-file, within 120 s."""
    deadline = time.monotonic() + 120
    while not (ready.exists() and ready.read_text().strip()):
        if src.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("migrate-src did not start: " + src_err.read_text()[-2000:])
        time.sleep(0.05)
    return ready.read_text().strip()


def migrate(bindir: Path, src_args: list[str], args: argparse.Namespace) -> dict:
    """One migration; returns the figures the tables use, from both sides' metrics."""
    with tempfile.TemporaryDirectory(prefix="bench-modes-") as tmp:
        t = Path(tmp)
        with open(t / "src.err", "w") as src_err:
            src = subprocess.Popen([str(bindir / "migrate-src"), "--listen", "127.0.0.1:0", "--ready-file",
                                    str(t / "ready"), "--metrics", str(t / "src.json"), "--guest-mib",
                                    str(args.mib), "--vcpus", "2", "--run-before", str(args.run_before), *src_args],
                                   stdout=subprocess.DEVNULL, stderr=src_err)
        try:
            addr = wait_ready(src, t / "ready", t / "src.err")
            dst = subprocess.run([str(bindir / "migrate-dst"), "--connect", addr, "--run-after", "0.5",
                                  "--metrics", str(t / "dst.json"), *(["--verify"] if args.verify else [])],
                                 capture_output=True, text=True, timeout=300)
            if dst.returncode not in (0, 3):
                raise RuntimeError(f"migrate-dst exited {dst.returncode}: {dst.stderr[-2000:]}")
            if src.wait(timeout=60) != 0:
                raise RuntimeError("migrate-src failed: " + (t / "src.err").read_text()[-2000:])
        finally:
            if src.poll() is None:
                src.kill()
                src.wait()
        return bl.mode_figures(json.loads((t / "src.json").read_text()), json.loads((t / "dst.json").read_text()))


def fmt(v: object, nd: int = 2) -> str:
    """A cell: "–" when missing, yes/NO, floats to ``nd`` places."""
    return bl.fmt(v, nd, missing="–", sci_from=None)


def table(rows: list[dict], cols: list[tuple[str, str, int]]) -> str:
    """A markdown table: cols are (header, key, decimal places)."""
    out = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k), nd) for _, k, nd in cols) + " |")
    return "\n".join(out)


def run_modes(bindir: Path, args: argparse.Namespace) -> list[dict]:
    """Every load in every mode, mode by mode within each load."""
    out = []
    for load, load_args in LOADS.items():
        for mode in MODES:
            log(f"{load} / {mode} ...")
            r = migrate(bindir, [*load_args, "--mode", mode], args)
            r.update(load=load, mode=mode)
            out.append(r)
            log(f"  {r}")
    return out


def run_repeated(bindir: Path, args: argparse.Namespace) -> list[dict]:
    """REPEATED, --repeat times, interleaved."""
    out = []
    for i in range(args.repeat):
        # Rotated each time: a run's place in the sequence matters on this VM (memory a previous run
        # freed, first touches), and must not always favour the same variant.
        for load, rate, variant, extra in bl.rotated(REPEATED, i):
            log(f"{load} / {variant} ({i + 1}/{args.repeat}) ...")
            r = migrate(bindir, [*LOADS["hotset"], *rate, *extra], args)
            r.update(load=load, variant=variant)
            out.append(r)
            log(f"  {r}")
    return out


def repeated_rows(order: list[dict]) -> dict[tuple[str, str], dict]:
    """The repeated runs' medians, by (load, variant), in REPEATED's order."""
    return {(load, variant): bl.repeated_row([r for r in order if r["load"] == load and r["variant"] == variant],
                                             load, variant)
            for load, _, variant, _ in REPEATED}


def report(results: dict, repeat: int) -> list[str]:
    """The markdown tables and the targets, as lines."""
    out = [f"### {results['mib']} MiB, 2 vCPUs, commit {results['git']}\n",
           table([dict(r, mib_sent=round(r["bytes_sent"] / 2**20)) for r in results["modes"]], MODES_COLUMNS)]
    rows = repeated_rows(results["order"])
    out += [f"\nRepeated {repeat} times, interleaved; medians:\n", table(list(rows.values()), REPEATED_COLUMNS),
            "\n| target | measured | met |\n|---|---|---|"]
    out += [f"| {name} | {value} | {'yes' if met else 'no'} |"
            for name, value, met in bl.mode_targets(results["modes"], rows)]
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="guest size (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each stream order on busy hotset (default 3)")
    ap.add_argument("--run-before", type=float, default=2.0,
                    help="guest seconds on the source before migrating: the pace the rounds are compared with")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip the replay proof")
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="interpreter of the venv where uffd-migrate is installed (default .venv)")
    return ap


def main() -> int:
    args = parser().parse_args()
    bindir = Path(args.python).parent
    if not (bindir / "migrate-src").exists():
        log(f"migrate-src is not installed next to {args.python}: run scripts/test, or pip install -e . there")
        return 2
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    results: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": rev.stdout.strip(), "mib": args.mib,
                     "modes": [], "order": []}
    results["modes"] = run_modes(bindir, args)
    results["order"] = run_repeated(bindir, args)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(report(results, args.repeat)))
    return 0
