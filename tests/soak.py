"""The soak: many small and mid-size migrations back to back on 127.0.0.1, each with a fault.

Every run migrates a random guest (8-128 MiB, any workload, 1-3 vCPUs, some
zero pages) with ``--verify`` and injects one fault, dealt from a shuffled
deck so that each fault comes up as often as the others:

- ``none``: the destination connects to the source directly;
- ``cut``: every link through the test proxy is closed at a random point of
  the stream;
- ``partition``: the links go silent (``CuttingProxy.freeze``) at a random
  point; the destination has ``--link-timeout 2``;
- ``kill-source``: SIGKILL to the source at a random point; the destination
  (``--reconnect-timeout 3``) must end non-zero with one error line within
  3 s plus a margin;
- ``kill-destination``: SIGKILL to the destination at a random point, then a
  new destination against the same source: that one is refused ("a
  migration is already in progress"), and the source
  (``--reconnect-timeout 3``) ends with one error line within 3 s plus a
  margin;
- ``flood``: 100 idle and 20 slow-drip connections (each drips a real Hello,
  a byte every 0.5 s) to the source, from a random moment within half a
  second of the destination's handshake, held through the switchover and the
  stream (at most 20 s): the migration must verify with no recovery, and the
  source's peak RSS stay within the guest's size plus 64 MiB.
- ``strangers``: from a random moment within half a second of the
  destination's handshake, strangers connect to the source: port scans that
  reset at once (``SO_LINGER`` 0) or close before a word, garbage, and a real
  migrate-dst that must be refused, with one line: a certificate from another
  CA against a TLS source, or TLS against a plaintext one.  The migration must
  verify with no recovery.

Every third run, whatever its fault, runs over mutual TLS
(certificates made once per soak with trustme).

Every run but ``none`` connects the destination through the test proxy
(``CuttingProxy``), whose byte count triggers the fault.  "A random point" is
a random fraction (5-85%) of the guest's non-zero bytes (zero pages cross as a
few bytes each).  A run whose migration ends before its mark had no fault
injected and is judged as a run without one.

Each run ends in one of: verified (exit 0, ``verified: true``, every page
placed), a clean failure (non-zero exit, exactly one ``error:`` line, no
traceback), or problems, counted by kind: pages lost, guests running on
zeros, spurious recoveries (any recovery, either side, on a run with no link
fault), tracebacks in any stderr, processes left behind (any child still
running when its run is over: killed and counted), unclear failures, and
other broken expectations.  Nothing waits without a bound: every run is under
``trio.fail_after`` (a run that overruns is a problem, and the soak goes on),
every expected exit under its own deadline.

``python tests/soak.py --minutes N`` (or ``scripts/soak``) prints one line per
run and a table per fault, and exits 1 if any problem was found.  Runs with
problems keep their directory (stderr and metrics of each process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from helpers import BIN, Pki, hostile, run_destination, start_source
from migrate import protocol as p
from proxy import CuttingProxy

FAULTS = ("none", "cut", "partition", "kill-source", "kill-destination", "flood", "strangers")
# Faults that break no link: the migration must verify with no recovery.
NO_LINK_FAULT = ("none", "flood", "strangers")
WORKLOADS = ("uniform", "hotset", "sequential", "readmostly")
# Kinds of problem, in the order the summary lists them.
PROBLEMS = ("pages lost", "guests on zeros", "spurious recoveries", "tracebacks", "left behind",
            "unclear failures", "other")

MARGIN_S = 5.0  # slack on every "within T seconds" expectation: the machine is shared, 2 cores
RUN_BUDGET_S = 120.0  # a run still going after this is stopped and counted as a problem
KILL_TIMEOUT_S = 3.0  # --reconnect-timeout of the side that survives a kill
RECONNECT_S = 10.0  # --reconnect-timeout of both sides otherwise
LINK_TIMEOUT_S = 10.0  # the default --link-timeout (the partition's destination gets 2)
PARTITION_LINK_TIMEOUT_S = 2.0
FLOOD_IDLE, FLOOD_DRIP = 100, 20  # connections held open / sending a byte every FLOOD_DRIP_EVERY
FLOOD_DRIP_EVERY = 0.5
FLOOD_MAX_S = 20.0  # the flood never outlasts this, whatever the migration does
FLOOD_CONNECT_S = 3.0  # one flood connection's connect (a full backlog drops SYNs for a while)
TLS_EVERY = 3  # every third run is over TLS, whatever its fault
STRANGER_RESETS, STRANGER_GARBAGE = 20, 5  # port scans (half reset, half close), garbage senders
STRANGER_REFUSED_S = 10.0  # the refused destination (--connect-timeout 2) ends within this
RSS_SLACK_MIB = 64  # the source's peak RSS may exceed its guest by this much under a flood
# A flood client drips a real Hello, one byte at a time: it stays a plausible handshake in progress.
DRIP = hostile(p.Hello(p.Channel.BULK, b"", bytes(32), bytes(32)), preamble=True)


@dataclass
class Plan:
    """One run: the guest, the fault, and when it strikes."""

    index: int
    fault: str
    guest_mib: int
    workload: str
    vcpus: int
    zero_fraction: float
    seed: int
    run_before: float
    run_after: float
    at: float  # fraction of the guest's non-zero bytes through the proxy when the fault strikes
    delay: float  # seconds from the destination's handshake to the flood or the strangers
    tls: bool  # mutual TLS on every connection

    @classmethod
    def draw(cls, index: int, fault: str, rng: random.Random) -> Plan:
        # --run-before counts from the source's start, and the destination connects about a second
        # later: a flooded source runs its guest long enough that the flood, which starts within half
        # a second of the destination's handshake, is in place for the switchover and the stream.
        run_before = round(rng.uniform(2, 3) if fault in ("flood", "strangers") else rng.uniform(0, 1), 2)
        return cls(index, fault, guest_mib=rng.randint(8, 128), workload=rng.choice(WORKLOADS),
                   vcpus=rng.randint(1, 3), zero_fraction=rng.choice([0.0, round(rng.uniform(0, 0.6), 2)]),
                   seed=rng.randrange(1, 2**31), run_before=run_before, run_after=round(rng.uniform(0, 0.3), 2),
                   at=round(rng.uniform(0.05, 0.85), 2),
                   delay=round(rng.uniform(0, 0.5), 2) if fault in ("flood", "strangers") else 0.0,
                   tls=index % TLS_EVERY == 0)

    @property
    def mark_bytes(self) -> int:
        """Bytes from the source through the proxy at which the fault strikes."""
        if self.fault in ("flood", "strangers"):
            return 1  # the destination's first bytes; then delay
        return max(1, int(self.at * self.guest_mib * 2**20 * (1 - self.zero_fraction)))

    def source_args(self, pki: Pki) -> list[str]:
        reconnect = KILL_TIMEOUT_S if self.fault == "kill-destination" else RECONNECT_S
        return [*(pki.args("src") if self.tls else []), "--guest-mib", str(self.guest_mib),
                "--workload", self.workload, "--vcpus", str(self.vcpus), "--zero-fraction", str(self.zero_fraction), "--seed", str(self.seed),
                "--run-before", str(self.run_before), "--reconnect-timeout", f"{reconnect:g}"]

    def destination_args(self, pki: Pki) -> list[str]:
        reconnect = KILL_TIMEOUT_S if self.fault == "kill-source" else RECONNECT_S
        args = [*(pki.args("dst") if self.tls else []), "--verify", "--run-after", str(self.run_after),
                "--reconnect-timeout", f"{reconnect:g}"]
        if self.fault == "partition":
            args += ["--link-timeout", f"{PARTITION_LINK_TIMEOUT_S:g}"]
        return args

    def describe(self) -> str:
        when = {"none": "", "flood": f" {self.delay:g} s in", "strangers": f" {self.delay:g} s in"}.get(
            self.fault, f" at {self.at:.0%}")
        return (f"#{self.index:<3} {self.fault + when:<24} {'tls' if self.tls else '   '} {self.guest_mib:3} MiB "
                f"{self.workload:10} {self.vcpus} vCPU zero {self.zero_fraction:.2f}")


@dataclass
class Outcome:
    """What one run showed: its verdict, and every problem found."""

    plan: Plan
    injected: bool = False
    verified: bool = False
    clean_failure: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, kind: str, detail: str) -> None:
        assert kind in PROBLEMS, kind
        self.problems.append((kind, detail))

    def line(self) -> str:
        if self.problems:
            verdict = "PROBLEM: " + "; ".join(f"{k}: {d}" for k, d in self.problems)
        else:
            verdict = "verified" if self.verified else "clean failure" if self.clean_failure else "?"
        missed = self.plan.fault != "none" and not self.injected
        injected = " (fault not injected: the migration ended first)" if missed else ""
        notes = f" ({'; '.join(self.notes)})" if self.notes and not self.problems else ""
        return f"{self.plan.describe()}{injected}: {verdict}{notes}"


@dataclass
class _Proc:
    """A result of one process: exit code (None while running), stderr, metrics."""

    name: str
    rc: int | None = None
    err: str = ""
    metrics: dict = field(default_factory=dict)


def _error_lines(err: str, prog: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _children() -> dict[int, str]:
    """This process's children, running or not yet reaped: pid → command name."""
    me, found = os.getpid(), {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == me:
            found[int(entry.name)] = name
    return found


async def _spawn_destination(tmp: Path, port: int, args: list[str]) -> trio.Process:
    """migrate-dst as a process the soak can kill (helpers.run_destination runs one to its end)."""
    with open(tmp / "dst.err", "w") as err:  # the child keeps its own copy
        return await trio.lowlevel.open_process(
            [str(BIN / "migrate-dst"), "--connect", f"127.0.0.1:{port}", "--metrics", str(tmp / "dst.json"), *args],
            stdout=subprocess.DEVNULL, stderr=err)


@dataclass
class FloodStats:
    connected: int = 0
    failed: int = 0  # refused, or no answer within FLOOD_CONNECT_S
    dropped: int = 0  # slow drips the source closed


async def flood(port: int, stats: FloodStats) -> None:
    """FLOOD_IDLE idle and FLOOD_DRIP slow-drip connections to 127.0.0.1:port, for at most FLOOD_MAX_S."""
    async def hold(drip: bytes) -> None:
        with trio.socket.socket() as s:
            connected = False
            with trio.move_on_after(FLOOD_CONNECT_S):
                try:
                    await s.connect(("127.0.0.1", port))
                    connected = True
                except OSError:
                    pass
            if not connected:
                stats.failed += 1
                return
            stats.connected += 1
            try:
                for i in range(len(drip)):
                    await s.send(drip[i:i + 1])
                    await trio.sleep(FLOOD_DRIP_EVERY)
                await trio.sleep_forever()
            except OSError:
                stats.dropped += 1

    with trio.move_on_after(FLOOD_MAX_S):
        async with trio.open_nursery() as nursery:
            for i in range(FLOOD_IDLE + FLOOD_DRIP):
                nursery.start_soon(hold, DRIP if i < FLOOD_DRIP else b"")


@dataclass
class StrangerStats:
    connected: int = 0  # port scans and garbage senders that reached the source
    refused: _Proc | None = None  # the migrate-dst that must be refused


async def strangers(port: int, stats: StrangerStats, plan: Plan, pki: Pki, stranger_pki: Pki, tmp: Path) -> None:
    """Port scans (reset or closed before a word), garbage, and a migrate-dst the source must refuse."""
    async def scan(i: int) -> None:
        with trio.socket.socket() as s:
            try:
                with trio.move_on_after(FLOOD_CONNECT_S):
                    await s.connect(("127.0.0.1", port))
                    stats.connected += 1
                    if i < STRANGER_RESETS // 2:
                        s.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
                    elif i >= STRANGER_RESETS:
                        await s.send(os.urandom(200))
            except OSError:
                pass

    async with trio.open_nursery() as nursery:
        for i in range(STRANGER_RESETS + STRANGER_GARBAGE):
            nursery.start_soon(scan, i)
            await trio.sleep(0.02)
        # A certificate from another CA against a TLS source; TLS against a plaintext one.
        refused_args = stranger_pki.args("dst") if plan.tls else pki.args("dst")
        stats.refused = _Proc("migrate-dst (refused)")
        (tmp / "refused").mkdir()
        await _run_to_end(tmp / "refused", port, ["--connect-timeout", "2", *refused_args], stats.refused,
                          trio.CancelScope(deadline=trio.current_time() + STRANGER_REFUSED_S))


async def _run_to_end(tmp: Path, port: int, args: list[str], result: _Proc, scope: trio.CancelScope) -> None:
    """helpers.run_destination inside ``scope``: cancelling it stops the destination (SIGTERM)."""
    with scope:
        result.rc, result.err, result.metrics = await run_destination(tmp, port, args)


async def _drive(plan: Plan, tmp: Path, out: Outcome, procs: list[tuple[str, trio.Process]],
                 pkis: tuple[Pki, Pki]) -> None:
    """Runs the migration with its fault and judges every process it started."""
    pki, stranger_pki = pkis
    src, port = await start_source(tmp, plan.source_args(pki))
    procs.append(("migrate-src", src))
    dst = _Proc("migrate-dst")
    dst_scope = trio.CancelScope()
    first: trio.Process | None = None  # kill-destination: the destination that gets killed
    struck_at: float | None = None
    stats = FloodStats()
    met = StrangerStats()

    async with trio.open_nursery() as nursery:
        def strike(_: int) -> None:
            nonlocal struck_at
            struck_at = trio.current_time()
            out.injected = True
            if plan.fault == "cut":
                proxy.cut()
            elif plan.fault == "partition":
                proxy.freeze()
            elif plan.fault == "kill-source":
                src.send_signal(signal.SIGKILL)
                dst_scope.deadline = struck_at + KILL_TIMEOUT_S + MARGIN_S
            elif plan.fault == "kill-destination" and first is not None:
                first.send_signal(signal.SIGKILL)
            elif plan.fault == "flood":
                async def later() -> None:
                    await trio.sleep(plan.delay)
                    await flood(port, stats)
                nursery.start_soon(later)
            elif plan.fault == "strangers":
                async def meet() -> None:
                    await trio.sleep(plan.delay)
                    await strangers(port, met, plan, pki, stranger_pki, tmp)
                nursery.start_soon(meet)

        proxy = CuttingProxy(port, [] if plan.fault == "none" else [plan.mark_bytes], strike)
        proxy_port = await nursery.start(proxy.serve)
        via = port if plan.fault == "none" else proxy_port

        if plan.fault == "kill-destination":
            first = await _spawn_destination(tmp, via, plan.destination_args(pki))
            procs.append(("migrate-dst", first))
            await first.wait()
            dst.rc, dst.err, dst.metrics = first.returncode, (tmp / "dst.err").read_text(), _read_json(tmp / "dst.json")
            if out.injected:
                again = tmp / "restarted"
                again.mkdir()
                restarted = _Proc("migrate-dst (restarted)")
                await _run_to_end(again, port, plan.destination_args(pki), restarted, trio.CancelScope(
                    deadline=trio.current_time() + KILL_TIMEOUT_S + 2 * MARGIN_S))
                _judge_refused(restarted, out)
        else:
            await _run_to_end(tmp, via, plan.destination_args(pki), dst, dst_scope)
        ended_at = trio.current_time()
        # The source ends by itself: at once after success; after its --reconnect-timeout otherwise.
        if plan.fault == "kill-destination" and struck_at is not None:
            src_deadline = struck_at + KILL_TIMEOUT_S + MARGIN_S
        else:
            src_deadline = ended_at + RECONNECT_S + LINK_TIMEOUT_S + MARGIN_S
        with trio.move_on_at(src_deadline):
            await src.wait()
        if plan.fault == "strangers" and out.injected:
            with trio.move_on_after(STRANGER_REFUSED_S + MARGIN_S):
                while met.refused is None or met.refused.rc is None:  # the refused destination ends too
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()  # the proxy, and a flood still going

    if plan.fault == "flood":
        out.injected = stats.connected > 0  # a flood that found no source was no flood
        out.notes.append(f"flood: {stats.connected} connected, {stats.failed} failed to connect, "
                         f"{stats.dropped} drips ended by the source")
    if plan.fault == "strangers":
        out.injected = met.connected > 0
        refused = _error_lines(met.refused.err, "migrate-dst")[:1] if met.refused else []
        out.notes.append(f"strangers: {met.connected} connected; " + (refused[0] if refused else "none refused"))
        if met.refused is not None:
            # Refused for its certificate or its protocol; or, when the migration ended first, no source.
            _judge_refused(met.refused, out, "certificate verify failed" if plan.tls else "wrong version number",
                           "cannot connect")
    source = _Proc("migrate-src", src.returncode, (tmp / "src.err").read_text(), _read_json(tmp / "src.json"))
    _judge(plan, out, dst, source, struck_at, ended_at)


def _judge_refused(restarted: _Proc, out: Outcome, why: str = "a migration is already in progress",
                   or_else: str | None = None) -> None:
    """A destination the source must refuse (a second one while a migration is in progress, or a
    stranger's): refused, with one line saying ``why`` (or ``or_else``, noted)."""
    if "Traceback" in restarted.err:
        out.problem("tracebacks", f"{restarted.name}: {restarted.err.strip().splitlines()[-1]}")
    lines = _error_lines(restarted.err, "migrate-dst")
    if restarted.rc is None:
        out.problem("left behind", f"{restarted.name} still running {KILL_TIMEOUT_S + 2 * MARGIN_S:g} s "
                                   "after it started; stopped")
    elif or_else and restarted.rc == 1 and len(lines) == 1 and or_else in lines[0]:
        out.notes.append(f"{restarted.name}: {lines[0]}")
    elif restarted.rc == 0 or len(lines) != 1 or why not in lines[0]:
        out.problem("unclear failures", f"{restarted.name} exited {restarted.rc} with "
                                        f"{lines or restarted.err.strip().splitlines()[-1:]}, not one line "
                                        f"saying {why}")


def _judge(plan: Plan, out: Outcome, dst: _Proc, src: _Proc, struck_at: float | None, ended_at: float) -> None:
    fault = plan.fault if out.injected else "none"
    for proc in (dst, src):
        if "Traceback" in proc.err:
            out.problem("tracebacks", f"{proc.name}: {proc.err.strip().splitlines()[-1]}")
    m = dst.metrics

    # The destination: verified, or one clean line.
    if fault == "kill-destination":
        pass  # killed by us; the source and the restarted destination are what count
    elif dst.rc is None:  # only a kill-source run sets its destination a deadline
        out.problem("left behind", f"migrate-dst still running {KILL_TIMEOUT_S + MARGIN_S:g} s after the source "
                                   "was killed; stopped")
    elif dst.rc == 0:
        if m.get("pages_placed") != m.get("pages_total"):
            out.problem("pages lost", f"exit 0 with {m.get('pages_placed')} of {m.get('pages_total')} pages placed")
        if m.get("verified") is not True:
            out.problem("guests on zeros", f"exit 0 with verified={m.get('verified')!r}")
        out.verified = not out.problems
        if fault in ("cut", "partition") and out.verified:
            out.notes.append(f"{len(m.get('recoveries', []))} recoveries")
    else:
        lines = _error_lines(dst.err, "migrate-dst")
        if m.get("verified") is False or dst.rc == 3:
            out.problem("other", f"migrate-dst exited {dst.rc}: the guest's memory or state differs from a replay")
        elif len(lines) != 1:
            out.problem("unclear failures", f"migrate-dst exited {dst.rc} with {len(lines)} error lines: "
                                            f"{dst.err.strip().splitlines()[-1:]}")
        elif fault in NO_LINK_FAULT:
            out.problem("other", f"failed with no link fault: {lines[0]}")
        else:
            out.clean_failure = True
            out.notes.append(lines[0])
            if fault == "kill-source" and struck_at is not None and ended_at - struck_at > KILL_TIMEOUT_S + MARGIN_S:
                out.problem("other", f"migrate-dst gave up {ended_at - struck_at:.1f} s after the source was killed "
                                     f"(--reconnect-timeout {KILL_TIMEOUT_S:g})")
            elif fault == "kill-source":
                out.notes.append(f"{ended_at - struck_at:.1f} s after the kill")

    # Recoveries where no link broke.
    if fault in NO_LINK_FAULT:
        if m.get("recoveries") or src.metrics.get("recoveries"):
            out.problem("spurious recoveries", f"destination {m.get('recoveries')}, "
                                               f"source {src.metrics.get('recoveries')}")

    # The source: success with its destination, else one line; killed when that was the fault.
    if fault == "kill-source" or src.rc is None:
        return  # killed by us; or still running, which the reaper counts
    src_lines = _error_lines(src.err, "migrate-src")
    if fault == "kill-destination":
        if src.rc != 1 or len(src_lines) != 1:
            out.problem("unclear failures", f"migrate-src exited {src.rc} with {src_lines or 'no error line'} "
                                            "after its destination was killed")
        else:
            out.clean_failure = True
            out.notes.append(src_lines[0])
    elif dst.rc == 0 and src.rc != 0:
        out.problem("other", f"migrate-src exited {src.rc} though its destination succeeded: {src_lines}")
    elif dst.rc != 0 and src.rc == 0:
        out.problem("other", f"migrate-src exited 0 though its destination exited {dst.rc}")
    elif src.rc != 0 and len(src_lines) != 1:
        out.problem("unclear failures", f"migrate-src exited {src.rc} with {len(src_lines)} error lines")
    if fault == "flood" and src.metrics:
        rss, guest = src.metrics.get("rss_mib", 0), src.metrics.get("guest_mib", plan.guest_mib)
        if rss > guest + RSS_SLACK_MIB:
            out.problem("other", f"source peak RSS {rss:g} MiB under the flood, over {guest:g} + {RSS_SLACK_MIB} MiB")
        else:
            out.notes.append(f"source RSS {rss:g} MiB")


async def _reap(procs: list[tuple[str, trio.Process]], out: Outcome, baseline: set[int]) -> None:
    """Every child must have ended with its run: kill and count the rest."""
    with trio.CancelScope(shield=True):
        for name, proc in procs:
            if proc.returncode is None:
                out.problem("left behind", f"{name} (pid {proc.pid}) still running at the end of the run; killed")
                proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
        for pid, name in _children().items():
            if pid in baseline:
                continue
            out.problem("left behind", f"child {name} (pid {pid}) still there at the end of the run; killed")
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


async def run_one(plan: Plan, tmp: Path, baseline: set[int], pkis: tuple[Pki, Pki]) -> Outcome:
    """One migration with its fault, bounded by RUN_BUDGET_S; every process reaped at the end."""
    out = Outcome(plan)
    procs: list[tuple[str, trio.Process]] = []
    try:
        with trio.fail_after(RUN_BUDGET_S):
            await _drive(plan, tmp, out, procs, pkis)
    except trio.TooSlowError:
        out.problem("other", f"the run did not finish within {RUN_BUDGET_S:g} s")
    except AssertionError as exc:  # start_source: the source died before listening
        out.problem("other", f"migrate-src did not start: {str(exc).strip().splitlines()[-1:]}")
    finally:
        await _reap(procs, out, baseline)
    return out


def table(outcomes: list[Outcome]) -> str:
    """Outcomes per fault, then problems per kind."""
    rows = [f"{'fault':<18}{'runs':>6}{'injected':>10}{'verified':>10}{'clean failures':>16}{'problems':>10}"]
    for fault in (*FAULTS, "total"):
        group = [o for o in outcomes if fault in ("total", o.plan.fault)]
        injected = "-" if fault == "none" else sum(o.injected for o in group)
        rows.append(f"{fault:<18}{len(group):>6}{injected:>10}{sum(o.verified for o in group):>10}"
                    f"{sum(o.clean_failure and not o.problems for o in group):>16}"
                    f"{sum(bool(o.problems) for o in group):>10}")
    counts = {k: sum(kind == k for o in outcomes for kind, _ in o.problems) for k in PROBLEMS}
    rows.append("problems: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return "\n".join(rows)


async def soak(minutes: float, seed: int, workdir: Path,
               say: Callable[[str], object] = print) -> list[Outcome]:
    """Runs migrations for ``minutes`` (and at least one of each fault); returns their outcomes.

    Directories of runs without problems are removed.
    """
    rng = random.Random(seed)
    baseline = set(_children())
    for name in ("pki", "stranger-pki"):
        (workdir / name).mkdir()
    pkis = (Pki(workdir / "pki"), Pki(workdir / "stranger-pki"))  # the migration's CA, and another
    deadline = trio.current_time() + minutes * 60
    outcomes: list[Outcome] = []
    deck: list[str] = []
    while trio.current_time() < deadline or len(outcomes) < len(FAULTS):
        if not deck:
            deck = rng.sample(FAULTS, len(FAULTS))
        plan = Plan.draw(len(outcomes) + 1, deck.pop(), rng)
        tmp = workdir / f"run-{plan.index:03d}-{plan.fault}"
        tmp.mkdir(parents=True)
        out = await run_one(plan, tmp, baseline, pkis)
        say(out.line())
        if not out.problems:
            shutil.rmtree(tmp)
        outcomes.append(out)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="soak", description="Migrations with injected faults, back to back, "
                                 "on 127.0.0.1; exits 1 if any run shows a problem.")
    ap.add_argument("--minutes", type=float, default=30, help="how long to keep starting runs (default 30)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random plans (default: random, printed)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to make the directory in which runs with problems keep their stderr and metrics "
                         "(default: /tmp)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="uffd-soak-", dir=args.workdir))
    print(f"soak: {args.minutes:g} minutes, seed {seed}, runs with problems kept in {workdir}", flush=True)
    outcomes = trio.run(soak, args.minutes, seed, workdir, lambda line: print(line, flush=True))
    print(table(outcomes))
    bad = [o for o in outcomes if o.problems]
    if not bad:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"soak: {len(outcomes)} runs, {len(bad)} with problems" + (f" (kept in {workdir})" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
