"""Migration modes end to end: postcopy, hybrid and precopy, both stream orders, every workload.

Real migrate-src and migrate-dst processes on 127.0.0.1; every run is proven
by replay (--verify).  The kernel tracks what the guest writes on the source;
the destination keeps no per-page state in any mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from helpers import DST, REPORT, assert_migrated, migrate, run_destination, start_source
from migrate.stats import DestinationStats, FirstWindow, SourceStats
from proxy import CuttingProxy

MODES = ["postcopy", "hybrid", "precopy"]
WORKLOADS = ["uniform", "hotset", "sequential", "readmostly"]
ORDERS = ["address", "working-set"]


def check_mode(run, mode: str) -> tuple[DestinationStats, SourceStats]:
    m, s = assert_migrated(run), run.src_metrics
    assert m.mode == s.mode == mode
    assert s.bytes_sent_total >= s.bytes_bulk > 0
    if mode == "postcopy":
        assert s.rounds == () and m.precopy_rounds == 0 and m.pages_discarded == 0
        return m, s
    rounds = s.rounds
    assert rounds and rounds[0].pages == m.pages_total  # round 1 streams every page
    assert m.precopy_rounds == len(rounds) + 1  # the switchover is the last, final round
    assert m.pages_replaced == sum(r.pages for r in rounds[1:] if not r.resent_after_recovery) \
        + s.switchover.stop_and_copy_pages
    assert s.guest_steps_per_s.during_precopy > 0
    if mode == "precopy":
        # The vCPUs start with every page present: nothing can fault, and downtime is the stop-and-copy.
        assert m.faults == 0 and m.vcpu_stall_us.count == 0 and m.pages_missing_at_switchover == 0
        assert m.pages_discarded == 0
        assert s.switchover.stop_and_copy_pages == s.switchover.dirty_pages
    else:
        # Discarded at switchover: what was written since the last scan.  Missing then: that, and what a
        # round that could not keep up discarded while the guest still ran on the source.
        switchover = s.switchover
        assert m.pages_discarded_at_switchover == switchover.pages_discarded <= switchover.dirty_pages
        assert m.pages_missing_at_switchover == switchover.dirty_pages
        assert m.pages_discarded == switchover.pages_discarded + sum((r.discarded or 0) for r in rounds)
    return m, s


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("mode", MODES)
async def test_every_mode_verifies(tmp_path: Path, mode: str, workload: str, order: str) -> None:
    run = await migrate(tmp_path, ["--guest-mib", "16", "--workload", workload, "--mode", mode, "--stream-order",
                                   order, "--run-before", "0.3"], DST, timeout=60)
    m, s = check_mode(run, mode)
    if mode == "postcopy" and order == "working-set":
        assert s.switchover.working_set_pages is not None


@pytest.mark.parametrize("mode", ["hybrid", "precopy"])
async def test_converging_rounds_leave_little_to_switch_over(tmp_path: Path, mode: str) -> None:
    """A guest that writes slowly (the QEMU-like load, scaled down): the rounds shrink until the
    last one is short, so little is left at switchover."""
    run = await migrate(tmp_path, ["--guest-mib", "64", "--workload", "uniform", "--rate", "25000",
                                   "--zero-fraction", "0.3", "--mode", mode, "--run-before", "0.5"], DST, timeout=60)
    m, s = check_mode(run, mode)
    dirty = [r.dirty_pages_found for r in s.rounds]
    assert len(dirty) >= 2 and dirty[-1] < dirty[0] / 2, s.rounds
    assert s.switchover.dirty_pages < m.pages_total / 20
    if mode == "hybrid":
        assert m.faults < 100
    REPORT.append(f"{mode} 64 MiB, 2 x 25k writes/s: {len(dirty)} rounds, dirty {dirty}, downtime "
                  f"{m.downtime_ms:.1f} ms, {m.faults} faults, verified")


async def test_precopy_rounds_is_obeyed(tmp_path: Path) -> None:
    """With the threshold out of reach, the rounds stop at --precopy-rounds, not before or after."""
    for rounds in (1, 3):
        run = await migrate(tmp_path, ["--guest-mib", "32", "--workload", "uniform", "--rate", "25000",
                                       "--mode", "hybrid", "--precopy-rounds", str(rounds), "--switchover-ms",
                                       "0.000001", "--run-before", "0.3"], DST, timeout=60)
        m, s = check_mode(run, "hybrid")
        assert len(s.rounds) == rounds, s.rounds


async def test_working_set_order_streams_the_hot_pages_of_every_vcpu_first(tmp_path: Path) -> None:
    """Hotset: each vCPU's hot pages are the first tenth of its slice.  In address order the first
    window is the start of vCPU 0's slice; in working-set order it already holds vCPU 1's hot pages."""
    pages, vcpus = 16384, 2
    hot1 = range(pages // vcpus, pages // vcpus + pages // vcpus // 10)
    first: dict[str, FirstWindow | None] = {}
    for order in ORDERS:
        run = await migrate(tmp_path, ["--guest-pages", str(pages), "--vcpus", str(vcpus), "--workload", "hotset",
                                       "--rate", "200000", "--stream-order", order, "--run-before", "0.3"], DST,
                            timeout=60)
        m, s = check_mode(run, "postcopy")
        first[order] = s.first_window
    assert first["address"].end <= hot1.start, first
    assert first["working-set"].end > hot1.start and first["working-set"].pages < hot1.start, first


def test_precopy_options_need_a_precopy_mode(cli) -> None:
    proc = cli("migrate-src", "--precopy-rounds", "3")
    assert proc.returncode == 1 and "--mode hybrid" in proc.stderr and "Traceback" not in proc.stderr


# -- recovery in every mode ---------------------------------------------------------------------
async def migrate_through_cuts(tmp_path: Path, src_args: list[str], marks: list[int],
                               cut_after_log: str | None = None) -> tuple[DestinationStats, SourceStats, str]:
    """Migrates through a CuttingProxy that cuts every link at each byte mark (source to destination),
    and once more as soon as the source logs ``cut_after_log``, if given."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            src, port = await start_source(tmp_path, src_args)
            proxy = CuttingProxy(port, marks, lambda _: proxy.cut())
            proxy_port = await nursery.start(proxy.serve)
            if cut_after_log is not None:
                nursery.start_soon(cut_when_logged, proxy, tmp_path / "src.err", cut_after_log)
            rc, err, raw = await run_destination(tmp_path, proxy_port, ["--verify", "--run-after", "0.2"])
            src_rc = await src.wait()
            nursery.cancel_scope.cancel()
    src_err = (tmp_path / "src.err").read_text()
    assert rc == 0, err
    assert src_rc == 0, src_err + "\n---dst---\n" + err
    cuts = len(marks) + (cut_after_log is not None)
    assert proxy.cuts == cuts
    m = DestinationStats.from_json(raw)
    assert m.verified is True and m.pages_placed == m.pages_total
    assert "Traceback" not in err + src_err
    s = SourceStats.from_json(json.loads((tmp_path / "src.json").read_text()))
    assert len(m.recoveries) == s.recoveries == cuts, err
    return m, s, err


async def cut_when_logged(proxy: CuttingProxy, log: Path, text: str) -> None:
    while text not in log.read_text():
        await trio.sleep(0.002)
    proxy.cut()


MIB = 1 << 20


async def test_hybrid_recovers_in_a_round_in_its_discards_and_after_switchover(tmp_path: Path) -> None:
    """A busy guest rewrites everything, so the rounds stop converging after round 1; the destination
    drops those pages in a discarding round, and postcopy carries the whole guest again.  Cut during
    round 1, as the discarding round begins, and once the vCPUs run here."""
    m, s, err = await migrate_through_cuts(tmp_path, ["--guest-mib", "128", "--zero-fraction", "0", "--workload",
                                                      "uniform", "--mode", "hybrid", "--run-before", "0.3"],
                                           [64 * MIB, 200 * MIB], cut_after_log="discarding them there now")
    assert err.count("before switchover") == 2  # the first two cuts came before the vCPUs ran here
    assert "destination back" in (tmp_path / "src.err").read_text()
    assert [r.round for r in s.rounds if r.resent_after_recovery][:1] == [1]
    assert any(r.discarded for r in s.rounds)
    assert m.faults > 0  # the last cut came once the vCPUs ran here
    REPORT.append(f"hybrid recovery: cut in round 1, in its discards and in postcopy, {[r.to_json() for r in m.recoveries]}, verified")


async def test_precopy_recovers_in_a_replacing_round(tmp_path: Path) -> None:
    """Cut during round 1, then as round 2 begins (the source logs the end of round 1 just before),
    whose pages replace older copies: that round is sent again whole (a replaced page that did not
    arrive is stale, not absent), and nothing faults."""
    m, s, err = await migrate_through_cuts(tmp_path, ["--guest-mib", "128", "--zero-fraction", "0", "--workload",
                                                      "uniform", "--rate", "50000", "--mode", "precopy",
                                                      "--run-before", "0.3"],
                                           [64 * MIB], cut_after_log="round 1: ")
    resent = [r.round for r in s.rounds if r.resent_after_recovery]
    assert resent == [1, 2], s.rounds
    assert m.faults == 0 and m.pages_missing_at_switchover == 0
    REPORT.append(f"precopy recovery: cut in round 1 and in round 2, {[r.to_json() for r in m.recoveries]}, verified, 0 faults")


async def test_precopy_recovers_during_the_stop_and_copy(tmp_path: Path) -> None:
    """A busy guest never converges: the stop-and-copy carries the whole guest again, and a cut there
    makes the source send the switchover again (the destination had not started its vCPUs)."""
    m, s, err = await migrate_through_cuts(tmp_path, ["--guest-mib", "128", "--zero-fraction", "0", "--workload",
                                                      "uniform", "--mode", "precopy", "--run-before", "0.3"],
                                           [180 * MIB])
    assert "wait for the switchover" in (tmp_path / "src.err").read_text()
    assert m.faults == 0 and m.pages_missing_at_switchover == 0


async def test_postcopy_working_set_recovers(tmp_path: Path) -> None:
    m, s, err = await migrate_through_cuts(tmp_path, ["--guest-mib", "128", "--zero-fraction", "0", "--workload",
                                                      "hotset", "--stream-order", "working-set", "--run-before",
                                                      "0.3"], [64 * MIB])
    assert s.switchover.working_set_pages > 0
