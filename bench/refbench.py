"""Benchmark uffd-migrate against C reference programs on this machine.

Compiles bench/ref/*.c into bench/build/, warms the machine's memory, then
runs rounds that interleave the C references (the ideal TCP-receive +
UFFDIO_COPY placer and the C fault round trip, each unloaded and with as many
busy spinner threads as the guest has vCPUs) with migrations by
migrate-src/migrate-dst, so each migration is compared with references
measured next to it, under the same load.  TLS twins of the idle and busy
guests (the same guest with --tls-* on both sides, certificates made once per
run with the openssl CLI into bench/build/tls/) run right after their plaintext
twin in every round.  A memory section (issue 22; full runs and --only memory)
runs the busy and QEMU-load guests on every memory kind (anon, memfd, hugetlb),
each kind next to a placer and a fault floor that move its own page size in its
own memory, the kinds interleaved round by round.  Prints figures, ratios, the
urgent path hop by hop, the targets of issue 9, TLS against plaintext (issue
13) and the memory kinds; writes bench/results.json.  It reports, it never
asserts: the exit status is non-zero only when something crashed or a
migration failed its verification.

    scripts/bench [--quick] [--rounds N] [--no-tls] [--no-memory] [--only memory] [--plot] [--python PATH]

This module runs things (scripts/bench starts it through bench/launcher.py,
under the venv); the arithmetic (medians, paired ratios, the rows, the
targets) is bench/benchlib.py and the text it prints bench/refreport.py,
both tested by tests/test_bench.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import benchlib as bl  # noqa: E402  (bench/, beside this file)

import refreport  # noqa: E402

REF_DIR = HERE / "ref"
BUILD = HERE / "build"
TLS_DIR = BUILD / "tls"
RESULTS = HERE / "results.json"
REFS = ("tcp_bulk", "ideal_placer", "fault_floor", "warm_memory")
VCPUS = 2  # every scenario's guest; the same-load references run as many spinners

# name -> (workload, extra migrate-src arguments, load of its references).
# "same": the references run VCPUS spinners; "unloaded": none (the idle guest's
# vCPUs barely run).
SCENARIOS = {
    # Nearly idle guest with no zero pages: pure streaming of the same bytes the
    # ideal placer moves (--idle-rate sets the rate).
    "idle": ("readmostly", ["--zero-fraction", "0"], "unloaded"),
    # The fresh-clone demo's guest: uniform, flat out, 25% zero pages.
    "busy": ("uniform", [], "same"),
    # QEMU's load: 2 vCPUs x 25,000 uniform accesses/s, 30% zero pages.
    "qemu": ("uniform", ["--rate", "25000", "--zero-fraction", "0.3"], "same"),
    "hotset": ("hotset", [], "same"),
}


def _with_tls_twins(scenarios):
    """Each scenario followed by its TLS twins (bl.TLS_TWINS: idle_tls, busy_tls), which share its
    guest, its options and its references, plus --tls-cert/--tls-key/--tls-ca on both sides."""
    out = {}
    for name, spec in scenarios.items():
        out[name] = spec
        out.update({tls: spec for tls, twin in bl.TLS_TWINS.items() if twin == name})
    return out


SCENARIOS = _with_tls_twins(SCENARIOS)
LOADS = {name: load for name, (_, _, load) in SCENARIOS.items()}  # scenario -> its references' load
# One round: each reference, then the migrations compared with it (ABAB); a
# TLS twin right after its plaintext twin.
ROUND = (("ref", "placer_unloaded"), ("mig", "idle"), ("mig", "idle_tls"), ("ref", "placer_same"), ("mig", "busy"),
         ("mig", "busy_tls"), ("ref", "floor_same"), ("mig", "qemu"), ("ref", "floor_unloaded"), ("mig", "hotset"))


class BenchError(Exception):
    pass


T0 = time.monotonic()


def log(msg=""):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- references

def build_refs():
    BUILD.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    for name in REFS:
        src, exe = REF_DIR / f"{name}.c", BUILD / name
        deps = [src, REF_DIR / "common.h"]
        if exe.exists() and all(exe.stat().st_mtime >= d.stat().st_mtime for d in deps):
            continue
        cmd = [cc, "-O2", "-Wall", "-pthread", "-o", str(exe), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise BenchError(f"compiling {src.name} failed:\n{r.stderr}")


def run_ref(name, *args, timeout=300):
    r = subprocess.run([str(BUILD / name), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise BenchError(f"{name} {' '.join(map(str, args))} failed "
                         f"(exit {r.returncode}):\n{r.stderr.strip()}")
    return json.loads(r.stdout)


def reference(kind, mib, faults):
    """One reference run of a round: the placer at the guest's size, or the fault floor."""
    spinners = VCPUS if kind.endswith("_same") else 0
    if kind.startswith("placer"):
        return run_ref("ideal_placer", mib, 256, spinners)
    return run_ref("fault_floor", faults, 256, spinners)


# ---------------------------------------------------------------- TLS

def _openssl(*args, timeout=60):
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise BenchError(f"openssl {' '.join(map(str, args[:2]))} failed (exit {r.returncode}):\n{r.stderr.strip()}")
    return r.stdout


def make_tls():
    """A throw-away CA and a certificate for each side, made once per run into bench/build/tls/.

    With the openssl CLI, as scripts/docker-demo does (the bench installs
    nothing beyond the project).  The source's certificate names 127.0.0.1 in
    an IP SAN: the destination checks the host it connects to.  Returns each
    side's --tls-* arguments.
    """
    if not shutil.which("openssl"):
        raise BenchError("the openssl command is not installed (Debian: apt-get install openssl)")
    shutil.rmtree(TLS_DIR, ignore_errors=True)
    TLS_DIR.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ca, ca_key, ext = TLS_DIR / "ca.pem", TLS_DIR / "ca.key", TLS_DIR / "san.ext"
    _openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=uffd-migrate-bench-ca", "-keyout", ca_key, "-out", ca)
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    out = {}
    for side in ("src", "dst"):
        cert, key, csr = (TLS_DIR / f"{side}.{x}" for x in ("pem", "key", "csr"))
        _openssl("req", *ec, "-subj", f"/CN=uffd-migrate-bench-{side}", "-keyout", key, "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
                 "-extfile", ext, "-out", cert)
        out[side] = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
    return out


def aes_gcm_speed():
    """AES-128-GCM (what TLS offers first) on one core, over 16 KiB (a full TLS record): GB/s of CPU time.

    ``openssl speed`` divides by the CPU time it got, so a busy machine does not
    lower the figure; 1 GiB costs 1.07 / GB/s seconds of one core to encrypt, and
    about as much to decrypt.
    """
    out = {}
    for mode, flag in (("encrypt_gbps", []), ("decrypt_gbps", ["-decrypt"])):
        text = _openssl("speed", "-mr", "-seconds", "1", "-bytes", "16384", *flag, "-evp", "aes-128-gcm")
        gbps = bl.openssl_speed_gbps(text)
        if gbps is not None:
            out[mode] = gbps
    return out


# ---------------------------------------------------------------- our commands

def find_commands(python):
    bindir = Path(python).parent
    cmds = {}
    for name in ("migrate-src", "migrate-dst"):
        p = bindir / name
        if not (p.exists() and os.access(p, os.X_OK)):
            raise BenchError(
                f"{name} not found next to {python} (looked for {p}).\n"
                f"Install uffd-migrate into that environment (scripts/test creates "
                f"{ROOT / '.venv'}), or pass --python <venv>/bin/python.")
        cmds[name] = str(p)
    return cmds


def _pump(stream, sink, lines):
    """Drain a child's stdout so it never blocks; hand lines to the waiter."""
    for line in stream:
        sink.write(line)
        sink.flush()
        lines.put(line)
    lines.put(None)


def _poll(p, cpu, name):
    """Popen.poll() that also keeps the child's CPU time (os.wait4's rusage) in cpu[name]."""
    if p.returncode is not None:
        return p.returncode
    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
    if pid == 0:
        return None
    p.returncode = os.waitstatus_to_exitcode(status)
    cpu[name] = {"user": ru.ru_utime, "sys": ru.ru_stime}
    return p.returncode


def source_args(scenario, mib, args, tls, memory=None):
    """migrate-src's arguments for a scenario, after --listen and --metrics: the guest (of memory kind
    ``memory``, if given), then TLS if a twin."""
    workload, extra, _ = SCENARIOS[scenario]
    if memory is not None:
        extra = ["--memory", memory, *extra]
    twin = bl.TLS_TWINS.get(scenario)
    if (twin or scenario) == "idle":
        extra = ["--rate", str(args.idle_rate), *extra]
    return ["--guest-mib", str(mib), "--vcpus", str(VCPUS), "--workload", workload, "--seed", "1",
            "--run-before", str(args.run_before), *extra, *(tls["src"] if twin is not None else [])]


def wait_listening(src, lines, t0):
    """The address migrate-src reports on stdout (``_pump``'s lines), within 60 s of t0."""
    while True:
        try:
            line = lines.get(timeout=max(1, t0 + 60 - time.monotonic()))
        except queue.Empty:
            raise BenchError("migrate-src did not report a listening address in 60 s")
        if line is None:
            raise BenchError(f"migrate-src exited ({src.wait()}) before listening")
        addr = bl.listening_address(line)
        if addr is not None:
            return addr


def wait_both(pending, t0, timeout):
    """Waits for both commands ({name: Popen}) to exit; returns each one's CPU time (``_poll``)."""
    # Poll both: when one side dies the other may wait for it forever.
    cpu = {}
    while pending:
        for name, p in list(pending.items()):
            rc = _poll(p, cpu, name)
            if rc is None:
                continue
            # migrate-dst exits 3 when --verify disproves the migration:
            # its metrics still say so, and the report shows it.
            if rc and not (name == "migrate-dst" and rc == 3):
                raise BenchError(f"{name} exited with status {rc}")
            del pending[name]
        if pending and time.monotonic() > t0 + timeout:
            raise BenchError(f"{', '.join(pending)} still running after {timeout:.0f} s")
        time.sleep(0.02)
    return cpu


def read_metrics(dst_metrics, src_metrics):
    """Both sides' metrics; a source that wrote none leaves {}, a destination that wrote none is an error."""
    out = {}
    for side, path in (("dst", dst_metrics), ("src", src_metrics)):
        try:
            out[side] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            if side == "dst":
                raise BenchError(f"migrate-dst wrote no readable metrics: {e}")
            out[side] = {}
    return out


def with_log_tails(e, files: dict[str, IO[str]], logdir, tag):
    """The error ``e`` with the tails of both sides' stderr and where the logs are."""
    tails = []
    for n in ("src.err", "dst.err"):
        files[n].flush()
        text = (logdir / f"{tag}.{n}").read_text().strip().splitlines()[-15:]
        if text:
            tails.append(f"--- {n} (tail) ---\n" + "\n".join(text))
    return BenchError("\n".join([str(e), *tails, f"logs: {logdir}/{tag}.*"]))


def migrate_once(cmds, scenario, mib, args, tag, tls=None, memory=None):
    """One migration; returns {"dst": metrics, "src": metrics, "wall_s": ..., "cpu_s": {side: {user, sys}}}.

    ``tls``: each side's --tls-* arguments (make_tls), for the TLS scenarios; ``memory``: the guest's
    memory kind (migrate-src --memory; the destination maps what the source says).
    """
    twin = bl.TLS_TWINS.get(scenario)
    if twin is not None and not tls:
        raise BenchError(f"{scenario} needs TLS certificates (make_tls)")
    tls_dst = tls["dst"] if twin is not None else []
    timeout = 90 + 40 * mib / 1024
    logdir = BUILD / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        src_metrics, dst_metrics = Path(tmp, "src.json"), Path(tmp, "dst.json")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        src_cmd = [cmds["migrate-src"], "--listen", "127.0.0.1:0", "--metrics", str(src_metrics),
                   *source_args(scenario, mib, args, tls, memory)]
        files = {n: open(logdir / f"{tag}.{n}", "w") for n in ("src.out", "src.err", "dst.out", "dst.err")}
        procs = []
        try:
            t0 = time.monotonic()
            src = subprocess.Popen(src_cmd, stdout=subprocess.PIPE, stderr=files["src.err"],
                                   text=True, env=env)
            procs.append(src)
            lines = queue.Queue()
            threading.Thread(target=_pump, args=(src.stdout, files["src.out"], lines),
                             daemon=True).start()
            addr = wait_listening(src, lines, t0)
            dst_cmd = [cmds["migrate-dst"], "--connect", addr, "--run-after", str(args.run_after),
                       "--metrics", str(dst_metrics), *tls_dst] + (["--verify"] if args.verify else [])
            dst = subprocess.Popen(dst_cmd, stdout=files["dst.out"], stderr=files["dst.err"],
                                   text=True, env=env)
            procs.append(dst)
            cpu = wait_both({"migrate-src": src, "migrate-dst": dst}, t0, timeout)
            return {"wall_s": round(time.monotonic() - t0, 3),
                    "cpu_s": {"src": cpu.get("migrate-src"), "dst": cpu.get("migrate-dst")},
                    **read_metrics(dst_metrics, src_metrics)}
        except BenchError as e:
            raise with_log_tails(e, files, logdir, tag) from None
        finally:
            for p in procs:  # only the processes this function started
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in files.values():
                f.close()


# ---------------------------------------------------------------- rounds

def steps(scenarios):
    """The steps of a round (ROUND) that these scenarios need: their migrations and their references."""
    refs = {ref for s in scenarios for ref in (bl.PLACER_REF[LOADS[s]], bl.FLOOR_REF[LOADS[s]])}
    return [(step, name) for step, name in ROUND if name in (scenarios if step == "mig" else refs)]


def run_step(cmds, step, name, mib, i, args, faults, tls, rnd, state):
    """One step of round i: a reference into rnd["refs"], or a migration into rnd["runs"] and rnd["raw"]."""
    if step == "ref":
        rnd["refs"][name] = reference(name, mib, faults)
    elif cmds is not None:
        run = migrate_once(cmds, name, mib, args, f"{name}-{mib}-r{i + 1}", tls)
        rnd["raw"][name] = run
        rnd["runs"][name] = bl.summarize(run["dst"], run.get("src", {}), mib, run["wall_s"],
                                         run.get("cpu_s"))
        if run["dst"].get("verified") is False:
            log(f"  {name}/{mib}: VERIFICATION FAILED (logs: {BUILD / 'logs'})")
            state["crashed"] = True


def failed(rnd: dict, state: dict, name: str, e: Exception) -> None:
    """Records a step that failed (its first line logged, the whole in results.json); the round goes on."""
    log(f"  {name} failed: {str(e).splitlines()[0]} (details in results.json)")
    rnd["errors"][name] = str(e)
    state["crashed"] = True


def run_rounds(cmds, mib, scenarios, rounds, args, faults, state, tls=None):
    """Runs `rounds` interleaved rounds at one guest size; returns them as a list.

    Each round: {"refs": {kind: reference JSON}, "runs": {scenario: summary},
    "raw": {scenario: both sides' metrics}, "errors": {step: message}}.
    """
    out = []
    for i in range(rounds):
        rnd = {"refs": {}, "runs": {}, "raw": {}, "errors": {}}
        for step, name in steps(scenarios):
            log(f"{mib} MiB round {i + 1}/{rounds}: {'migrating ' + name if step == 'mig' else name}")
            try:
                run_step(cmds, step, name, mib, i, args, faults, tls, rnd, state)
            except (BenchError, subprocess.TimeoutExpired, ValueError) as e:
                failed(rnd, state, name, e)
        out.append(rnd)
    return out


# ---------------------------------------------------------------- memory kinds (issue 22)

HUGE_FLOOR_MIB = 64  # the hugetlb fault floor's region (32 pages, touched in passes) and as much bulk target
HUGE_FLOOR_FAULTS = 2000  # 2 MiB each: about 1 s per phase of the floor; 1000 with --quick


def memory_round_steps(kinds, i):
    """Round i of the memory section: per kind, its placer, its busy guest, its fault floor, its QEMU load;
    the kinds' order rotates from round to round, so none always runs first (or next to the same one)."""
    return [(step, bl.memory_key(kind, name)) for kind in bl.rotated(kinds, i)
            for step, name in (("ref", "placer_same"), ("mig", "busy"), ("ref", "floor_same"), ("mig", "qemu"))]


def memory_reference(key, mib, faults, quick):
    """One reference of a kind, under the same load as its guests (VCPUS spinners), at its page size."""
    kind, name = key.split(":")
    huge = kind == "hugetlb"
    if name == "placer_same":
        return run_ref("ideal_placer", mib, 2048 if huge else 256, VCPUS, kind)
    if huge:
        return run_ref("fault_floor", HUGE_FLOOR_FAULTS // (2 if quick else 1), HUGE_FLOOR_MIB, VCPUS, kind)
    return run_ref("fault_floor", faults, 256, VCPUS, kind)


def run_memory_rounds(cmds, mib, kinds, rounds, args, faults, state):
    """The memory section's rounds (memory_round_steps), shaped as run_rounds' are."""
    out = []
    for i in range(rounds):
        rnd = {"refs": {}, "runs": {}, "raw": {}, "errors": {}}
        for step, key in memory_round_steps(kinds, i):
            log(f"memory {mib} MiB round {i + 1}/{rounds}: {'migrating ' + key if step == 'mig' else key}")
            try:
                if step == "ref":
                    rnd["refs"][key] = memory_reference(key, mib, faults, args.quick)
                    continue
                kind, scenario = key.split(":")
                run = migrate_once(cmds, scenario, mib, args, f"{kind}-{scenario}-{mib}-r{i + 1}", memory=kind)
                rnd["raw"][key] = run
                rnd["runs"][key] = bl.summarize(run["dst"], run.get("src", {}), mib, run["wall_s"], run.get("cpu_s"))
                if run["dst"].get("verified") is False:
                    log(f"  {key}/{mib}: VERIFICATION FAILED (logs: {BUILD / 'logs'})")
                    state["crashed"] = True
            except (BenchError, subprocess.TimeoutExpired, ValueError) as e:
                failed(rnd, state, key, e)
        out.append(rnd)
    return out


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def huge_pages_free():
    """Free 2 MiB huge pages not promised to a mapping (HugePages_Free - HugePages_Rsvd), from /proc/meminfo."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0])
    if info.get("Hugepagesize") != 2048:
        raise BenchError(f"the default huge page is {info.get('Hugepagesize')} kB, not 2048")
    return info["HugePages_Free"] - info["HugePages_Rsvd"]


def reserve_huge_pages(need):
    """Raises the huge page pool so that ``need`` pages are free; returns how many it added (0 when the pool
    had enough).  Raises BenchError when it cannot (not root, memory fragmented)."""
    free = huge_pages_free()
    if free >= need:
        return 0
    before = int(NR_HUGEPAGES.read_text())
    try:
        NR_HUGEPAGES.write_text(str(before + need - free))
    except OSError as e:
        raise BenchError(f"the hugetlb runs need {need} free 2 MiB huge pages, {free} are; raising "
                         f"{NR_HUGEPAGES} failed ({e.strerror}): as root, echo {before + need - free} > {NR_HUGEPAGES}")
    added = int(NR_HUGEPAGES.read_text()) - before
    if huge_pages_free() < need:
        give_back_huge_pages(added)
        raise BenchError(f"the kernel reserved only {huge_pages_free()} of {need} huge pages (memory fragmented?)")
    return added


def give_back_huge_pages(added):
    """Lowers the pool by what reserve_huge_pages added, not to a size read before: other programs on the
    machine (a test suite's fixture) may have raised or lowered it since, and their pages are theirs."""
    if added:
        NR_HUGEPAGES.write_text(str(max(0, int(NR_HUGEPAGES.read_text()) - added)))


def memory_section(cmds, args, faults, state, results):
    """The memory kinds' section (issue 22): every kind's busy and QEMU-load guests against a placer and a
    fault floor of the kind's page size and memory, interleaved with anon's; fills results["memory"].

    Reserves the huge pages the hugetlb runs need (both sides of a migration hold a whole guest: no
    MAP_NORESERVE) and gives them back; warms them first (freshly reserved pages are cold host memory),
    with one untimed hugetlb migration as well.  Without them, the other kinds run and the section says why.
    """
    mib = 256 if args.quick else 1024
    kinds = list(args.memory_kinds)
    rounds = args.rounds or (2 if args.quick else 3)
    added, skipped = 0, {}
    if "hugetlb" in kinds:
        need = 2 * mib // 2 + 8  # two guests of mib/2 pages, and a few for the pool's own fragmentation
        try:
            added = reserve_huge_pages(need)
            free = huge_pages_free()
            log(f"memory: {free} free 2 MiB huge pages" + (f" ({added} added to the pool)" if added else "")
                + "; warming them")
            results["warmup"]["huge_pages"] = run_ref("warm_memory", 2 * free, "hugetlb")
            migrate_once(cmds, "busy", 256, args, "warmup-hugetlb", memory="hugetlb")
        except (BenchError, OSError, subprocess.TimeoutExpired) as e:
            log(f"memory: hugetlb skipped: {str(e).splitlines()[0]}")
            skipped["hugetlb"] = str(e)
            kinds.remove("hugetlb")
            give_back_huge_pages(added)
            added = 0
    try:
        blocks = run_memory_rounds(cmds, mib, kinds, rounds, args, faults, state)
    finally:
        if added:
            give_back_huge_pages(added)
            log(f"memory: the {added} huge pages added given back (pool now {NR_HUGEPAGES.read_text().strip()})")
    results["memory_rounds"] = blocks
    results["memory"] = bl.memory_section(blocks, mib, kinds, args.quick)
    results["memory"]["skipped"] = skipped
    results["memory"]["fault_floor_faults"] = {"4k": faults, "2m": HUGE_FLOOR_FAULTS // (2 if args.quick else 1)}


# ---------------------------------------------------------------- plot

def first_round_timelines(results):
    """{"scenario/mib": [[t_s, bulk_placed, urgent_placed], ...]} of each size's first round (where the
    metrics have one)."""
    series = {}
    for mib, rounds in results.get("rounds", {}).items():
        for s, run in (rounds[0].get("raw", {}) if rounds else {}).items():
            pts = run.get("dst", {}).get("placed_timeline")
            if pts:
                series[f"{s}/{mib}"] = pts
    return series


def plot(results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot: matplotlib is not installed here; skipping the plots")
        return
    series = first_round_timelines(results)
    if not series:
        log("--plot: the metrics carry no timeline; nothing to plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, pts in series.items():
        axes[0].plot([p[0] for p in pts], [p[1] + p[2] for p in pts], label=key)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], label=key)
    axes[0].set(xlabel="s", ylabel="pages placed", title="pages placed (first round)")
    axes[1].set(xlabel="s", ylabel="pages", title="pages placed on request")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    out = BUILD / "bench.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    log(f"--plot: wrote {out}")


# ---------------------------------------------------------------- main

def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="256 MiB guests, 2 rounds of idle, busy, their TLS twins and QEMU's load (about a minute)")
    ap.add_argument("--rounds", type=int, metavar="N",
                    help="interleaved rounds at the headline size (default 3; 2 with --quick)")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false",
                    help="full run without the 256 MiB and 4 GiB rounds")
    ap.add_argument("--warm-mib", type=int, metavar="N",
                    help="MiB of memory to touch once before measuring (default: twice the largest guest, "
                         "at least 1024; 0 skips the warm-up)")
    ap.add_argument("--plot", action="store_true", help="draw plots if matplotlib is installed")
    ap.add_argument("--python", help="interpreter of the venv where uffd-migrate is installed "
                                     "(default: .venv/bin/python, created and installed when missing)")
    ap.add_argument("--run-before", type=float, default=1.0, help="guest seconds on the source")
    ap.add_argument("--run-after", type=float, default=1.0, help="guest seconds on the destination")
    ap.add_argument("--idle-rate", type=int, default=1, metavar="N",
                    help="accesses per second per vCPU of the idle guest (default 1)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the replay check of the migrated guest")
    ap.add_argument("--refs-only", action="store_true", help="measure the C references only")
    ap.add_argument("--no-tls", dest="tls", action="store_false",
                    help="skip the TLS twins of the idle and busy guests")
    ap.add_argument("--only", choices=["memory"],
                    help="run one section alone: 'memory' = the memory kinds (busy and QEMU-load guests on each "
                         "--memory kind against references of its page size; 1 GiB, 3 rounds, about 3.5 minutes; "
                         "--quick: 256 MiB, 2 rounds)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="full run without the memory kinds section (--quick always leaves it out)")
    ap.add_argument("--memory-kinds", type=lambda v: v.split(","), default=list(bl.MEMORY_KINDS), metavar="K,K",
                    help="the memory section's kinds (default anon,memfd,hugetlb; hugetlb reserves its huge pages "
                         "as root and gives them back)")
    return ap


def make_plan(quick, rounds, scaling, tls):
    """[(guest MiB, scenarios, rounds)]: the headline size first, then (full runs) the scaling sizes."""
    head = 256 if quick else 1024
    head_scenarios = ("idle", "busy", "qemu") if quick else ("idle", "busy", "qemu", "hotset")
    if tls:
        head_scenarios += tuple(bl.TLS_TWINS)  # run in ROUND's order: each right after its twin
    plan = [(head, head_scenarios, rounds or (2 if quick else 3))]
    if not quick and scaling:
        plan += [(256, ("idle", "busy", "hotset"), 1), (4096, ("idle", "busy", "hotset"), 1)]
    return plan


def plan_json(plan):
    return [{"mib": m, "scenarios": list(s), "rounds": r} for m, s, r in plan]


def new_results(args, python, plan, faults):
    """results.json's opening: what this run is, on what machine, with which options."""
    results = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "loadavg_at_start": list(os.getloadavg())},
        "python": python,
        "head_mib": plan[0][0] if plan else None,
        "only": args.only,
        "plan": plan_json(plan),
        "run_before_s": args.run_before,
        "run_after_s": args.run_after,
        "idle_rate": args.idle_rate,
        "verify": args.verify,
        "vcpus": VCPUS,
        "fault_floor_faults": faults,
        "refs": {},
        "warmup": {},
    }
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True)
        results["git"] = rev.stdout.strip() or None
    except OSError:
        pass
    return results


def set_up_tls(results, plan):
    """Certificates and the AES speed for the TLS twins; returns (each side's --tls-* arguments, the plan).

    Without the openssl command the bench still runs, without its TLS twins: the plan loses them.
    """
    if not any(t in s for _, s, _ in plan for t in bl.TLS_TWINS):
        return None, plan
    try:
        log(f"TLS: a throw-away CA and certificates for both sides in {TLS_DIR.relative_to(ROOT)}/")
        tls = make_tls()
        try:
            results["tls"] = {"aes_128_gcm_one_core": aes_gcm_speed()}
        except (BenchError, OSError, subprocess.TimeoutExpired, ValueError) as e:
            log(f"openssl speed failed: {str(e).splitlines()[0]}")
            results["tls"] = {"aes_128_gcm_one_core": None}
        return tls, plan
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        log(f"TLS set-up failed, the TLS twins are skipped: {str(e).splitlines()[0]}")
        results["tls"] = {"error": str(e)}
        plan = [(m, tuple(x for x in s if x not in bl.TLS_TWINS), r) for m, s, r in plan]
        results["plan"] = plan_json(plan)
        return None, plan


def set_up(args, python, results, warm_mib):
    """The C references built, the machine warmed, loopback TCP measured; returns our commands (None with
    --refs-only).  Raises BenchError, TimeoutExpired or ValueError."""
    cmds = None
    log("building C references")
    build_refs()
    if warm_mib:
        log(f"warm-up: touching {warm_mib} MiB once")
        results["warmup"]["memory"] = run_ref("warm_memory", warm_mib)
    if not args.refs_only:
        cmds = find_commands(python)
        shutil.rmtree(BUILD / "logs", ignore_errors=True)  # this run's logs only
        if warm_mib:
            log("warm-up: one untimed migration (busy, 256 MiB)")
            migrate_once(cmds, "busy", 256, args, "warmup")
            results["warmup"]["migration"] = "busy, 256 MiB"
    tcp = [run_ref("tcp_bulk", "1G" if args.quick else "2G") for _ in range(1 if args.quick else 2)]
    results["refs"]["tcp_bulk"] = tcp
    results["tcp_gbps"] = bl.median(t["tcp_gbps"] for t in tcp)
    return cmds


def main():
    ap = parser()
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be at least 1")
    # scripts/bench (bench/launcher.py) has installed the project into .venv if it was missing.
    python = args.python or str(ROOT / ".venv" / "bin" / "python")
    plan = [] if args.only else make_plan(args.quick, args.rounds, args.scaling, args.tls and not args.refs_only)
    memory = not args.refs_only and (args.only == "memory" or (args.memory and not args.quick))
    if memory and (bad := [k for k in args.memory_kinds if k not in bl.MEMORY_KINDS]):
        ap.error(f"--memory-kinds: {', '.join(bad)}: not a memory kind ({', '.join(bl.MEMORY_KINDS)})")
    head = plan[0][0] if plan else (256 if args.quick else 1024)
    largest = max([mib for mib, _, _ in plan] or [head])
    warm_mib = args.warm_mib if args.warm_mib is not None else max(1024, 2 * largest)
    faults = 10000 if args.quick else 20000  # p99 of fewer swings 100x between runs
    results = new_results(args, python, plan, faults)
    state = {"crashed": False}
    tls, plan = set_up_tls(results, plan)
    cmds = None
    try:
        cmds = set_up(args, python, results, warm_mib)
    except (BenchError, subprocess.TimeoutExpired, ValueError) as e:
        log(f"set-up failed: {e}")
        results["error"] = str(e)
        state["crashed"] = True

    if "error" not in results and plan:
        blocks = {mib: run_rounds(cmds, mib, scenarios, n, args, faults, state, tls) for mib, scenarios, n in plan}
        results["rounds"] = {str(m): r for m, r in blocks.items()}
        bl.compute(results, blocks, head, args.quick, LOADS, VCPUS)
    if "error" not in results and memory:
        memory_section(cmds, args, faults, state, results)
    results["elapsed_s"] = round(time.monotonic() - T0, 1)

    try:  # scripts/bench-restore keeps its results in the same file, under "restore"
        restore = json.loads(RESULTS.read_text()).get("restore")
    except (OSError, ValueError):
        restore = None
    if restore is not None:
        results["restore"] = restore
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    lines = refreport.report(results)
    if lines:
        print("\n".join(lines))
    print(f"\nwrote {RESULTS.relative_to(ROOT)} in {results['elapsed_s']} s")
    if args.plot:
        try:
            plot(results)
        except Exception as e:  # a plot must never sink the benchmark
            log(f"--plot failed: {e}")
    return 1 if state["crashed"] else 0
