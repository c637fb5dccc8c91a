"""The restore bench (bench/restorebench.py): its C floor serves a real VMM stand-in correctly, and its
ratios pair each of our restores with the floor of the same round.  Speed is never asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import restorebench as rb
from helpers import BIN
from test_restore import snapshot


@pytest.mark.parametrize("mode", ["ondemand", "all"])
def test_the_floor_handler_restores_a_snapshot_the_vmm_proves(tmp_path: Path, mode: str) -> None:
    """file_handler takes the VMM's handoff as migrate-dst does, fills the memory from the file; the VMM verifies."""
    exe = rb.build_handler()
    snap = snapshot(tmp_path, "--workload", "uniform", mib=16)
    sock = tmp_path / "floor.sock"
    handler = subprocess.Popen([str(exe), str(sock), str(snap / "memory"), mode], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(handler.stdout.readline()) == {"listening": str(sock)}
        vmm = subprocess.run([str(BIN / "migrate-vmm"), "--snapshot", str(snap), "--handoff", str(sock), "--seconds",
                              "0.3", "--firecracker", "1.7"], capture_output=True, text=True, timeout=60)
        out, err = handler.communicate(timeout=30)
    finally:
        if handler.poll() is None:
            handler.kill()
            handler.wait()
    assert vmm.returncode == 0 and vmm.stderr.splitlines()[-1] == "verified: yes", vmm.stderr
    assert handler.returncode == 0, err
    fig = json.loads(out.splitlines()[-1])
    assert fig["pages_placed"] == fig["pages_total"] == 16 * 256 and fig["faults"] >= 1
    # all: the first fault copies the file; the other vCPU may have faulted in the same read
    assert (fig["faults"] <= 2) if mode == "all" else (fig["faults"] >= fig["pages_placed"]), fig


def _run(variant: str, rnd: int, **figures: float) -> dict:
    base = {"mib": 256, "workload": "hotset", "variant": variant, "round": rnd, "first_step_ms": 1.0,
            "stall_total_ms": 100.0, "stall_p50_us": 20.0, "stall_p99_us": 90.0, "faults": 1000,
            "all_present_s": 1.0, "stream_gbps": None}
    return {**base, **figures}


def test_ratios_pair_ours_with_the_floor_of_its_round() -> None:
    runs = [_run("floor", 0, first_step_ms=1.0), _run("floor-all", 0, all_present_s=0.2, stream_gbps=2.0),
            _run("ours", 0, first_step_ms=10.0, all_present_s=0.4, stream_gbps=1.0),
            _run("floor", 1, first_step_ms=2.0), _run("floor-all", 1, all_present_s=0.1, stream_gbps=4.0),
            _run("ours", 1, first_step_ms=40.0, all_present_s=0.5, stream_gbps=1.0)]
    rows = {r["variant"]: r for r in rb.summarize(runs)}
    ours = rows["ours"]
    assert ours["first_step_ms"] == 25.0 and ours["x_first_step_ms"] == 15.0  # median of 10x and 20x
    assert ours["x_all_present_s"] == 3.5  # against floor-all: 2x and 5x
    assert ours["x_stream_gbps"] == 0.38  # 0.5 and 0.25
    assert rows["floor"]["stream_gbps"] is None and "x_faults" not in rows["floor"]
    assert "(×15.00)" in rb.table(list(rows.values()))
