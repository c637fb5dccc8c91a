"""The link bench: migrations over emulated WAN links (bench/wan.py), pre-paging policies side by side.

``scripts/bench-links`` runs it; it writes ``bench/links.json`` and, with
``--plot``, PNGs next to it.  It reports, it never asserts (exit status 1 only
when something crashed or a migration did not verify).  Parts:

1. **The links themselves**, with the C references through the same link:
   ``bench/ref/tcp_bulk.c`` (bulk goodput: the link must sustain the rate it
   claims) and ``bench/pingpong.c`` (a 4 KiB reply's round trip, idle, then
   next to a saturating ``tcp_bulk`` with and without the DSCP EF mark).
2. **The cap**: ``--max-bandwidth`` over loopback, the stream's rate over
   every 1 s window against the cap.
3. **The urgent path** with our commands, a flat-out uniform guest (faults
   all the way) saturating the link: the request/reply round trip
   (``hops_us.network``) when the bottleneck is one FIFO (before), with a
   headroom cap (``--max-bandwidth`` below the link's rate), and with the
   urgent band (DSCP EF, after).
4. **Policies**: every ``--prepage`` policy on hotset, sequential and uniform
   guests at QEMU's anchor pace (``--rate 25000``), on every link, plus
   flat-out guests on one.  The Hines & Gopalan metric: network faults as a
   share of the working set, the distinct pages the guest touched between
   switchover and the last page's arrival, computed here by replaying the
   guest (``working_set``); the product keeps no such set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
RESULTS = HERE / "links.json"
sys.path.insert(0, str(HERE))

from wan import Link, LinkSpec, LinkUnavailable, URGENT_TOS, build_forwarder, emulated_link  # noqa: E402

LINKS = ["10Gbit,0.1ms", "1Gbit,1ms", "1Gbit,10ms"]
QUICK_LINKS = ["1Gbit,1ms"]
WORKLOADS = ["hotset", "sequential", "uniform"]
POLICIES = ["none", "jump", "bubble", "adaptive"]
REALISTIC_RATE = 25_000  # accesses per second per vCPU: QEMU's anchor load
# The policies run with the stream capped under the link (0.9 of its rate in
# payload is 0.94 of it on the wire, with TCP/IP headers): the queue at
# the bottleneck stays short, so what the stream sends next is decided close
# to when it leaves (and replies are not held behind it even without DSCP).
POLICY_CAP = 0.9


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tools

def build_tools() -> dict[str, Path]:
    """Compiles the C tools the link bench runs (into bench/build/) and returns their paths."""
    BUILD.mkdir(parents=True, exist_ok=True)
    tools = {"wanfwd": build_forwarder()}
    for name, src in (("tcp_bulk", HERE / "ref" / "tcp_bulk.c"), ("pingpong", HERE / "pingpong.c")):
        exe = BUILD / name
        deps = [src, HERE / "ref" / "common.h"]
        if not exe.exists() or any(exe.stat().st_mtime < d.stat().st_mtime for d in deps):
            r = subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-Wall", "-pthread", f"-I{HERE}", "-o", str(exe),
                                str(src)], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"compiling {src.name} failed:\n{r.stderr}")
        tools[name] = exe
    return tools


def _json_out(cmd: list[str], timeout: float) -> dict[str, Any]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout)


# ---------------------------------------------------------------- 1. the link

def validate(link: Link, tools: dict[str, Path], seconds: float = 3.0) -> dict[str, Any]:
    """The C references through the link: bulk goodput, and a reply's round trip idle and loaded."""
    spec = link.spec
    src, dst = link.netns_path("src"), link.netns_path("dst")
    # The best of three: a link cannot carry more than its rate, so the best run says what it sustains
    # (the others say how much this shared machine took from it meanwhile).
    bulks = [_json_out([str(tools["tcp_bulk"]), str(round(spec.bytes_per_s * seconds)), src, dst, link.dst_addr],
                       timeout=60 + 3 * seconds) for _ in range(3)]
    bulk = max(bulks, key=lambda b: b["tcp_gbps"])
    idle = _json_out([str(tools["pingpong"]), "200", dst, src, link.src_addr, "0", "2000"], timeout=60)
    out: dict[str, Any] = {
        "tcp_goodput_gbps": round(bulk["tcp_gbps"] * 8, 3),
        # TCP/IP/Ethernet headers take 66 of every 1514 bytes on the wire: full use of the link
        # carries 95.6% of its rate as payload.
        "tcp_share_of_rate": round(bulk["tcp_gbps"] * 8e9 / spec.rate_bps / (1448 / 1514), 3),
        "tcp_goodput_gbps_runs": [round(b["tcp_gbps"] * 8, 3) for b in bulks],
        "rtt_idle_us": idle["rtt_us"],
    }
    for name, tos in (("fifo", "0"), ("ef", hex(URGENT_TOS))):
        load = subprocess.Popen([str(tools["tcp_bulk"]), str(round(spec.bytes_per_s * 4)), src, dst, link.dst_addr],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)  # past slow start: the bottleneck queue is full
            out[f"rtt_loaded_{name}_us"] = _json_out([str(tools["pingpong"]), "300", dst, src, link.src_addr, tos,
                                                      "2000"], timeout=60)["rtt_us"]
        finally:
            load.communicate(timeout=120)
    return out


# ---------------------------------------------------------------- migrations

class Migration:
    """One migration: migrate-src on the link's source side (or 127.0.0.1), migrate-dst on the other."""

    def __init__(self, python: Path, link: Link | None, workdir: Path) -> None:
        self.bindir = python.parent
        self.link = link
        self.workdir = workdir

    def run(self, src_args: list[str], dst_args: list[str], timeout: float = 180) -> dict[str, Any]:
        w = self.workdir
        key = w / "key"
        key.write_text(secrets.token_hex(32))
        for f in ("ready", "src.json", "dst.json"):
            (w / f).unlink(missing_ok=True)
        host = self.link.src_addr if self.link else "127.0.0.1"
        pre_src = self.link.exec_in("src") if self.link else []
        pre_dst = self.link.exec_in("dst") if self.link else []
        common = ["--key-file", str(key), "--no-progress", "-q"]
        src_cmd = [*pre_src, str(self.bindir / "migrate-src"), "--listen", f"{host}:0", "--ready-file",
                   str(w / "ready"), "--metrics", str(w / "src.json"), *common, *src_args]
        procs: list[subprocess.Popen[bytes]] = []
        t0 = time.monotonic()
        try:
            with open(w / "src.err", "wb") as se, open(w / "dst.err", "wb") as de:
                src = subprocess.Popen(src_cmd, stdout=subprocess.DEVNULL, stderr=se)
                procs.append(src)
                while not ((w / "ready").exists() and (w / "ready").read_text().strip()):
                    if src.poll() is not None or time.monotonic() > t0 + 60:
                        raise RuntimeError(f"migrate-src did not start: {(w / 'src.err').read_text()[-2000:]}")
                    time.sleep(0.02)
                addr = (w / "ready").read_text().strip()
                dst = subprocess.Popen([*pre_dst, str(self.bindir / "migrate-dst"), "--connect", addr,
                                        "--metrics", str(w / "dst.json"), *common, *dst_args],
                                       stdout=subprocess.DEVNULL, stderr=de)
                procs.append(dst)
                for p, name in ((dst, "migrate-dst"), (src, "migrate-src")):
                    rc = p.wait(timeout=max(1.0, t0 + timeout - time.monotonic()))
                    if rc and not (name == "migrate-dst" and rc == 3):
                        err = (w / ("dst.err" if p is dst else "src.err")).read_text()
                        raise RuntimeError(f"{name} exited {rc}: {err[-2000:]}")
            return {"src": json.loads((w / "src.json").read_text()), "dst": json.loads((w / "dst.json").read_text()),
                    "wall_s": round(time.monotonic() - t0, 3)}
        finally:
            for p in procs:  # only the processes this method started
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    p.wait()


def guest_args(workload: str, mib: int, rate: int, seed: int = 1) -> list[str]:
    return ["--guest-mib", str(mib), "--vcpus", "2", "--workload", workload, "--rate", str(rate), "--seed", str(seed)]


# ---------------------------------------------------------------- the working set

def working_set(workload: str, mib: int, seed: int, start: list[int], end: list[int]) -> int:
    """Distinct pages a guest touched between two step counts per vCPU, by replaying it.

    The guest's accesses depend only on its seed and step counts, so a local
    replay (the product's own vCPU code, untimed) touches the same pages.  A
    replay guest has every page written first (no shared zero page, which
    would not count), runs to ``start``, has its accessed bits cleared
    (``/proc/self/clear_refs``) and its TLB entries flushed, runs on to
    ``end``, and the pages whose
    accessed bit is set (``Referenced`` in ``/proc/self/smaps``) are the
    working set.  Bench tooling only: the product keeps no such set.
    """
    from migrate.guest import Guest, GuestSpec, Workload

    pages = mib * 256
    spec = GuestSpec(pages=pages, vcpus=len(start), workload=Workload[workload], seed=seed, zero_permille=0)
    guest = Guest(spec, fill=True)
    try:
        guest.start(list(start))
        guest.join()
        Path("/proc/self/clear_refs").write_text("1")
        _flush_tlb(guest.base, spec.size)
        guest.start([max(e, s) for s, e in zip(start, end)])
        guest.join()
        return _referenced_pages(guest.base)
    finally:
        guest.close()


def _flush_tlb(base: int, size: int) -> None:
    """Flushes the TLB entries of a region: clear_refs clears accessed bits without a flush (x86
    treats them as a hint), and an access through a stale TLB entry would not set the bit again.
    Taking write permission away and giving it back changes every PTE, which flushes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for prot in (1, 3):  # PROT_READ, then PROT_READ | PROT_WRITE
        if libc.mprotect(base, size, prot):
            raise OSError(ctypes.get_errno(), "mprotect of the replay guest")


def _referenced_pages(base: int) -> int:
    text = Path("/proc/self/smaps").read_text()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        lo = int(block.split("-", 1)[0], 16)
        if lo == base:
            fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", block, re.M))
            if int(fields.get("AnonHugePages", "0")):
                raise RuntimeError("the replay guest got transparent huge pages: accessed bits are per 2 MiB")
            return int(fields["Referenced"]) // 4
    raise RuntimeError("the replay guest's mapping is not in /proc/self/smaps")


# ---------------------------------------------------------------- summaries

def summary(run: dict[str, Any]) -> dict[str, Any]:
    d, s = run["dst"], run["src"]
    stall = d.get("vcpu_stall_us") or {}
    return {
        "verified": d.get("verified"),
        "total_s": d.get("total_s"),
        "stream_gbps": d.get("stream_gbps"),
        "faults": d.get("faults"),
        "requests": d.get("requests"),
        "stall_count": stall.get("count"),
        "stall_p50_us": stall.get("p50"),
        "stall_p99_us": stall.get("p99"),
        "stall_total_ms": stall.get("total_ms"),
        "network_p50_us": ((d.get("hops_us") or {}).get("network") or {}).get("p50"),
        "network_p99_us": ((d.get("hops_us") or {}).get("network") or {}).get("p99"),
        "fault_service_p50_us": (d.get("fault_service_us") or {}).get("p50"),
        "eexist": d.get("eexist"),
        "pages_total": d.get("pages_total"),
        "steps_switchover": s.get("vcpu_steps"),
        "steps_placed": d.get("vcpu_steps_at_placed"),
        "prepage_stats": s.get("prepage_stats"),
        "pacer_waits": s.get("pacer_waits"),
    }


def window_rates(timeline: list[list[float]], window: float = 1.0) -> list[float]:
    """The stream's rate (bytes/s) over every ``window``-second stretch of a ``[t, bytes]`` timeline,
    while it streamed: samples after the last byte (the source waits for DestDone) are left out."""
    if timeline:
        last = timeline[-1][1]
        timeline = timeline[: next(i for i, (_, b) in enumerate(timeline) if b == last) + 1]
    rates = []
    for i, (t0, b0) in enumerate(timeline):
        for t1, b1 in timeline[i + 1:]:
            if t1 - t0 >= window - 1e-6:
                rates.append((b1 - b0) / (t1 - t0))
                break
    return rates


# ---------------------------------------------------------------- the parts

def part_links(specs: list[LinkSpec], tools: dict[str, Path]) -> dict[str, Any]:
    out = {}
    for spec in specs:
        log(f"link {spec.name}: C references through it")
        with emulated_link(spec) as link:
            out[spec.name] = validate(link, tools)
        out[spec.name]["forwarder"] = link.forwarder
        v = out[spec.name]
        log(f"  tcp {v['tcp_goodput_gbps']} Gbit/s goodput ({100 * v['tcp_share_of_rate']:.0f}% of the rate), "
            f"idle rtt p50 {v['rtt_idle_us']['p50']} us, loaded p50 fifo {v['rtt_loaded_fifo_us']['p50']} us, "
            f"ef {v['rtt_loaded_ef_us']['p50']} us")
    return out


def part_cap(python: Path, workdir: Path, caps: list[str], mib: int) -> dict[str, Any]:
    """--max-bandwidth over loopback: the stream's rate over every 1 s window against the cap."""
    from migrate.cli import parse_rate

    out = {}
    for cap in caps:
        rate = parse_rate(cap)
        size = max(mib, round(rate * 3 / 2**20))  # three seconds of stream at least
        log(f"cap {cap}: a {size} MiB guest of non-zero pages over loopback")
        run = Migration(python, None, workdir).run(
            [*guest_args("readmostly", size, 1), "--zero-fraction", "0", "--max-bandwidth", cap, "--run-before", "0.3"],
            ["--run-after", "0.1"])
        rates = window_rates(run["src"].get("stream_timeline") or [])
        out[cap] = {"cap_bytes_per_s": rate, "guest_mib": size, "total_s": run["dst"]["total_s"],
                    "windows": len(rates),
                    "min_over_cap": round(min(rates) / rate, 4) if rates else None,
                    "max_over_cap": round(max(rates) / rate, 4) if rates else None,
                    "within_5pct": bool(rates) and all(abs(r / rate - 1) <= 0.05 for r in rates)}
        log(f"  {len(rates)} one-second windows at {out[cap]['min_over_cap']}-{out[cap]['max_over_cap']} of the cap")
    return out


def part_urgent(python: Path, workdir: Path, specs: list[LinkSpec], mib: int, verify: bool,
                repeat: int) -> dict[str, Any]:
    """A flat-out uniform guest (faults all the way) while its stream saturates the link; ``repeat``
    runs of each case, the cases interleaved, medians reported."""
    out: dict[str, Any] = {}
    dst = ["--run-after", "0.2"] + (["--verify"] if verify else [])
    for spec in specs:
        cases = {
            "fifo": (False, None),  # before: one FIFO at the bottleneck, no cap
            "fifo+headroom": (False, POLICY_CAP),  # the stream capped under the link's rate
            "ef": (True, None),  # after: the urgent band for DSCP EF
            "ef+headroom": (True, POLICY_CAP),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
        for i in range(repeat):
            for name, (prio, cap) in cases.items():
                s = LinkSpec(spec.rate_bps, spec.rtt_ms, spec.queue_ms, priority=prio)
                extra = ["--max-bandwidth", str(round(s.bytes_per_s * cap))] if cap else []
                log(f"urgent path, {spec.name}, {name} ({i + 1}/{repeat})")
                with emulated_link(s) as link:
                    run = Migration(python, link, workdir).run(
                        [*guest_args("uniform", mib, 0), "--run-before", "0.5", *extra], dst)
                sm = summary(run)
                sm["forwarder_drops"] = {k: v.get("drops_queue") for k, v in link.forwarder.items()}
                runs[name].append(sm)
                log(f"  request->reply p50 {sm['network_p50_us']} us p99 {sm['network_p99_us']} us, fault service "
                    f"p50 {sm['fault_service_p50_us']} us, stream {sm['stream_gbps']} GB/s, verified {sm['verified']}")
        out[spec.name] = {name: {**{k: _median([r.get(k) for r in group]) for k in (
            "network_p50_us", "network_p99_us", "fault_service_p50_us", "stream_gbps", "faults", "total_s")},
            "verified": all(r.get("verified") is not False for r in group), "runs": group}
            for name, group in runs.items()}
    return out


MEDIAN_KEYS = ("faults", "working_set_pages", "faults_over_working_set", "stall_total_ms", "stall_count",
               "stall_p50_us", "stall_p99_us", "total_s", "stream_gbps", "network_p50_us")


def part_policies(python: Path, workdir: Path, specs: list[LinkSpec], workloads: list[str], policies: list[str],
                  rates: dict[str, int], mib: int, verify: bool, repeat: int) -> dict[str, Any]:
    """Every policy on every guest and link, ``repeat`` times each, interleaved (policy innermost, so
    that a noisy stretch of this shared machine hits every policy alike); the medians lead."""
    out: dict[str, Any] = {}
    dst = ["--run-after", "0.2"] + (["--verify"] if verify else [])
    for spec in specs:
        cap = ["--max-bandwidth", str(round(spec.bytes_per_s * POLICY_CAP))]
        with emulated_link(spec) as link:
            for pace, rate in rates.items():
                for workload in workloads:
                    runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in policies}
                    for i in range(repeat):
                        for policy in policies:
                            key = f"{spec.name}/{pace}/{workload}/{policy}"
                            log(f"policy {key} ({i + 1}/{repeat})")
                            run = Migration(python, link, workdir).run(
                                [*guest_args(workload, mib, rate, seed=1 + i), "--run-before", "1", "--prepage", policy,
                                 *cap], dst)
                            sm = summary(run)
                            if sm["steps_switchover"] and sm["steps_placed"]:
                                sm["working_set_pages"] = working_set(workload, mib, 1 + i, sm["steps_switchover"],
                                                                      sm["steps_placed"])
                                sm["faults_over_working_set"] = round(sm["faults"] / max(1, sm["working_set_pages"]), 4)
                            sm["placed_timeline"] = run["dst"].get("placed_timeline")
                            sm["stall_hist"] = (run["dst"].get("vcpu_stall_us") or {}).get("hist")
                            runs[policy].append(sm)
                            log(f"  faults {sm['faults']} of a working set of {sm.get('working_set_pages')} "
                                f"({100 * (sm.get('faults_over_working_set') or 0):.1f}%), stalls {sm['stall_total_ms']} "
                                f"ms in all, {sm['total_s']} s, verified {sm['verified']}")
                    for policy, group in runs.items():
                        key = f"{spec.name}/{pace}/{workload}/{policy}"
                        med = {k: _median([r.get(k) for r in group]) for k in MEDIAN_KEYS}
                        # The plots draw the run whose faults are the median's.
                        pick = min(group, key=lambda r: abs((r.get("faults") or 0) - (med["faults"] or 0)))
                        out[key] = {**med, "verified": all(r.get("verified") is not False for r in group),
                                    "repeat": len(group), "placed_timeline": pick["placed_timeline"],
                                    "stall_hist": pick["stall_hist"], "pages_total": pick["pages_total"],
                                    "runs": [{k: v for k, v in r.items() if k not in ("placed_timeline", "stall_hist")}
                                             for r in group]}
    return out


def _median(xs: list[Any]) -> Any:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return round(statistics.median(xs), 4) if xs else None


# ---------------------------------------------------------------- report

def report(res: dict[str, Any]) -> None:
    print(f"link bench, {res['when']}, {res['machine']}")
    if res.get("links"):
        print("\nlinks (C references through each):")
        for name, v in res["links"].items():
            print(f"  {name:<14} tcp {v['tcp_goodput_gbps']:6.3f} Gbit/s goodput = {100 * v['tcp_share_of_rate']:5.1f}% of the "
                  f"rate;  reply rtt p50 idle {v['rtt_idle_us']['p50']:8.0f} us, saturated: fifo "
                  f"{v['rtt_loaded_fifo_us']['p50']:8.0f} us, EF band {v['rtt_loaded_ef_us']['p50']:8.0f} us")
    if res.get("cap"):
        print("\n--max-bandwidth over loopback (every 1 s window):")
        for cap, v in res["cap"].items():
            print(f"  {cap:<6} {v['windows']:3} windows at {v['min_over_cap']}-{v['max_over_cap']} of the cap: "
                  f"{'within 5%' if v['within_5pct'] else 'NOT within 5%'}")
    if res.get("urgent"):
        print("\nurgent path, flat-out uniform guest saturating the link (request -> reply, less the source's hold):")
        for link, cases in res["urgent"].items():
            rtt = (res.get("links", {}).get(link) or {}).get("rtt_idle_us", {}).get("p50")
            print(f"  {link} (idle reply rtt p50 {rtt} us)")
            for name, sm in cases.items():
                print(f"    {name:<14} p50 {sm['network_p50_us']:>8} us  p99 {sm['network_p99_us']:>8} us  "
                      f"stream {sm['stream_gbps']} GB/s  faults {sm['faults']}")
    if res.get("policies"):
        print("\npolicies: network faults / working set (H&G), total vCPU stall ms, time s")
        rows: dict[str, dict[str, str]] = {}
        for key, sm in res["policies"].items():
            link, pace, workload, policy = key.split("/")
            share = sm.get("faults_over_working_set")
            cell = (f"{100 * share:5.1f}% {sm['stall_total_ms']:7.1f} {sm['total_s']:5.2f}" if share is not None
                    else "-")
            rows.setdefault(f"{link} {pace} {workload}", {})[policy] = cell
        print(f"  {'':<34}" + "".join(f"{p:>22}" for p in POLICIES))
        for row, cells in rows.items():
            print(f"  {row:<34}" + "".join(f"{cells.get(p, '-'):>22}" for p in POLICIES))
    if res.get("targets"):
        print("\ntargets:")
        for name, t in res["targets"].items():
            met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            print(f"  {name:<66} {str(t['value']):>18}  {met}" + (f" ({t['policy']})" if t.get("policy") else ""))


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """Issue 12's targets, from what this run measured (None: not measured)."""
    out: dict[str, Any] = {}
    pol = res.get("policies") or {}
    for workload in ("hotset", "sequential"):
        cases = {k.rsplit("/", 1)[1]: v for k, v in pol.items() if k.startswith(f"1Gbit,1ms/realistic/{workload}/")}
        shares = {p: v.get("faults_over_working_set") for p, v in cases.items() if v.get("faults_over_working_set")
                  is not None}
        if shares:
            best = min(shares, key=lambda p: shares[p])
            jump = (cases.get("jump") or {}).get("stall_total_ms")
            out[f"{workload}: best policy's faults / working set <= 5%"] = {
                "value": shares[best], "policy": best, "met": shares[best] <= 0.05}
            stall = cases[best].get("stall_total_ms")
            out[f"{workload}: best policy's total stall <= 50% of jump's"] = {
                "value": round(stall / jump, 3) if stall is not None and jump else None, "policy": best,
                "met": stall is not None and bool(jump) and stall <= 0.5 * jump}
    urgent = (res.get("urgent") or {}).get("1Gbit,1ms") or {}
    rtt = ((res.get("links") or {}).get("1Gbit,1ms") or {}).get("rtt_idle_us", {}).get("p50")
    for case in ("fifo", "fifo+headroom", "ef"):
        p50 = (urgent.get(case) or {}).get("network_p50_us")
        out[f"urgent reply p50 <= RTT + 1 ms at 1 Gbit/s ({case})"] = {
            "value": p50, "rtt_us": rtt, "met": None if p50 is None or rtt is None else p50 <= rtt + 1000}
    for cap, v in (res.get("cap") or {}).items():
        out[f"--max-bandwidth {cap} within 5% over every 1 s window"] = {
            "value": [v["min_over_cap"], v["max_over_cap"]], "met": v["within_5pct"]}
    for name, v in (res.get("links") or {}).items():
        out[f"link {name} sustains its rate (tcp_bulk >= 95% of it, headers aside)"] = {
            "value": v["tcp_share_of_rate"], "met": v["tcp_share_of_rate"] >= 0.95}
    return out


def plot(res: dict[str, Any], outdir: Path) -> list[Path]:
    """One PNG per link, pace and guest: pages placed over time per policy (all of them, and those
    that came by the urgent path, i.e. faults), and the stall CDF against the link's floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from migrate.plot import stall_cdf, timelines

    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for key, sm in (res.get("policies") or {}).items():
        link, pace, workload, policy = key.split("/")
        groups.setdefault(f"{link}/{pace}/{workload}", {})[policy] = sm
    written = []
    for group, runs in groups.items():
        fig, (placed, urgent, cdf_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
        for policy, sm in runs.items():
            fake = {"placed_timeline": sm.get("placed_timeline"), "total_s": sm.get("total_s"),
                    "pages_placed": sm.get("pages_total"), "vcpu_stall_us": {"hist": sm.get("stall_hist")}}
            series = timelines(fake)
            if series.get("placed"):
                placed.plot([t for t, _ in series["placed"]], [n for _, n in series["placed"]], label=policy)
            if series.get("urgent"):
                urgent.plot([t for t, _ in series["urgent"]], [n for _, n in series["urgent"]], label=policy)
            cdf = stall_cdf(fake)
            if cdf:
                cdf_ax.plot([x for x, _ in cdf], [y for _, y in cdf], label=f"{policy} ({sm.get('stall_count'):.0f} stalls)")
        floor = ((res.get("links") or {}).get(group.split("/")[0]) or {}).get("rtt_idle_us", {}).get("p50")
        if floor:
            cdf_ax.axvline(floor, color="grey", linestyle="--", label=f"floor: a reply's idle round trip ({floor:.0f} µs)")
        placed.set(xlabel="s since switchover", ylabel="pages placed", title=f"all pages placed, {group}")
        urgent.set(xlabel="s since switchover", ylabel="pages placed on request",
                   title="pages the vCPUs faulted on (urgent path)")
        cdf_ax.set(xscale="log", xlabel="vCPU stall (µs)", ylabel="fraction of stalls", title="stall CDF")
        for ax in (placed, urgent, cdf_ax):
            if ax.lines:
                ax.legend(fontsize=8)
        fig.tight_layout()
        out = outdir / f"links-{group.replace('/', '-').replace(',', '-')}.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench-links", description=__doc__.split("\n\n")[0])
    ap.add_argument("--link", action="append", metavar="RATE,RTT",
                    help=f"a link to run over, e.g. 1Gbit,1ms (repeatable; default: {' '.join(LINKS)})")
    ap.add_argument("--quick", action="store_true", help=f"one link ({QUICK_LINKS[0]}), realistic pace only")
    ap.add_argument("--parts", default="links,cap,urgent,policies",
                    help="which parts to run, comma-separated: links, cap, urgent, policies (default: all)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="guests for the policies part")
    ap.add_argument("--policies", default=",".join(POLICIES), help="policies to compare")
    ap.add_argument("--guest-mib", type=int, default=256, help="guest size (default 256)")
    ap.add_argument("--repeat", type=int, metavar="N", help="runs of each policy case, medians reported "
                                                            "(default 3; 1 with --quick)")
    ap.add_argument("--queue-ms", type=float, default=5.0, help="the bottleneck queue, in ms at the link's rate")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip the replay proof of each migration")
    ap.add_argument("--plot", action="store_true", help="draw PNGs next to bench/links.json (matplotlib: .[plot])")
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="interpreter of the venv with uffd-migrate installed (default .venv/bin/python)")
    ap.add_argument("--out", default=str(RESULTS), help="results file (default bench/links.json)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the parts this run does not measure from the existing results file")
    ap.add_argument("--replot", action="store_true", help="only redraw the plots of the existing results file")
    args = ap.parse_args(argv)
    if args.replot:
        for png in plot(json.loads(Path(args.out).read_text()), Path(args.out).parent):
            print(f"wrote {png}")
        return 0
    try:
        specs = [LinkSpec.parse(t, queue_ms=args.queue_ms) for t in (args.link or (QUICK_LINKS if args.quick else LINKS))]
    except ValueError as exc:
        ap.error(str(exc))
    parts = set(args.parts.split(","))
    repeat = args.repeat or (1 if args.quick else 3)
    python = Path(args.python)
    if not (python.parent / "migrate-src").exists():
        print(f"scripts/bench-links: error: migrate-src not found next to {python}\n"
              f"scripts/bench-links: hint: python3 -m venv .venv && .venv/bin/pip install -e '.[plot]'", file=sys.stderr)
        return 2
    try:
        from wan import check
        check()
    except LinkUnavailable as exc:
        print(f"scripts/bench-links: error: {exc}\nscripts/bench-links: hint: run it as root", file=sys.stderr)
        return 2
    out = Path(args.out)
    res: dict[str, Any] = json.loads(out.read_text()) if args.keep and out.exists() else {}
    res.pop("errors", None)
    res.update({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
                           "links_run": [s.name for s in specs], "queue_ms": args.queue_ms, "guest_mib": args.guest_mib,
                           "policy_cap_of_rate": POLICY_CAP, "repeat": repeat})
    try:
        res["git"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
    except OSError:
        pass
    failed = False
    t0 = time.monotonic()
    tools = build_tools()
    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        work = Path(tmp)
        steps = [
            ("links", lambda: part_links(specs, tools)),
            ("cap", lambda: part_cap(python, work, ["50M", "500M"], 64)),
            ("urgent", lambda: part_urgent(python, work, [s for s in specs if s.rate_bps <= 1e9] or specs[:1],
                                           args.guest_mib, args.verify, repeat)),
            ("policies", lambda: part_policies(
                python, work, specs, args.workloads.split(","), args.policies.split(","),
                {"realistic": REALISTIC_RATE}, args.guest_mib, args.verify, repeat)),
            ("flat_out", lambda: part_policies(
                python, work, [s for s in specs if s.name == "1Gbit,1ms"] or specs[:1], ["hotset", "sequential"],
                args.policies.split(","), {"flat-out": 0}, args.guest_mib, args.verify, repeat)),
        ]
        for name, fn in steps:
            if (name if name != "flat_out" else "policies") not in parts or (name == "flat_out" and args.quick):
                continue
            try:
                got = fn()
                if name == "flat_out":
                    res.setdefault("policies", {}).update(got)
                else:
                    res[name] = got
            except Exception as exc:  # a part that crashes is reported; the others still run
                log(f"{name} failed: {exc}")
                res.setdefault("errors", {})[name] = str(exc)
                failed = True
            out.write_text(json.dumps(res, indent=1) + "\n")  # what is done so far survives a later crash
    for key, sm in (res.get("policies") or {}).items():
        if sm.get("verified") is False:
            failed = True
    res["targets"] = targets(res)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    out.write_text(json.dumps(res, indent=1) + "\n")
    report(res)
    print(f"\nwrote {out} in {res['elapsed_s']} s")
    if args.plot:
        try:
            for png in plot(res, out.parent):
                print(f"wrote {png}")
        except ImportError:
            log("--plot: matplotlib is not installed (pip install -e '.[plot]')")
    return 1 if failed else 0
