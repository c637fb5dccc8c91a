"""Plots out of the box: python -m migrate.plot draws a real migration's metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import migrate

from migrate.plot import main, stall_cdf, timelines

PNG = b"\x89PNG\r\n\x1a\n"


def test_timeline_of_placed_pages_and_of_bulk_and_urgent() -> None:
    old = {"placed_timeline": [[0, 0], [0.1, 500]], "total_s": 0.15, "pages_placed": 1024}
    assert timelines(old) == {"placed": [(0.0, 0.0), (0.1, 500.0), (0.15, 1024.0)]}
    new = {"placed_timeline": [[0, 0, 0], [0.1, 480, 20], [0.2, 1000, 24]], "total_s": 0.2, "pages_placed": 1024}
    assert timelines(new) == {"bulk": [(0.0, 0.0), (0.1, 480.0), (0.2, 1000.0)],
                              "urgent": [(0.0, 0.0), (0.1, 20.0), (0.2, 24.0)],
                              "placed": [(0.0, 0.0), (0.1, 500.0), (0.2, 1024.0)]}
    assert timelines({}) == {} and timelines({"placed_timeline": []}) == {}


def test_stall_cdf_from_the_fine_histogram_or_from_qemus_buckets() -> None:
    cdf = stall_cdf({"vcpu_stall_us": {"hist": [[40.0, 3], [10.0, 1], [900.0, 4]]}})
    assert cdf == [(10.0, 0.125), (40.0, 0.5), (900.0, 1.0)]
    qemu = [0] * 24
    qemu[5], qemu[9] = 1, 3  # [32, 64) µs and [512, 1024) µs
    assert stall_cdf({"vcpu_stall_us": {"qemu_dist": qemu}}) == [(64.0, 0.25), (1024.0, 1.0)]
    assert stall_cdf({"vcpu_stall_us": {"count": 0}}) == []


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrate.plot", *args], capture_output=True, text=True, timeout=60)


async def test_plot_draws_a_real_migration_in_both_timeline_shapes(tmp_path: Path) -> None:
    run = await migrate(tmp_path, ["--guest-mib", "32", "--workload", "uniform", "--run-before", "0.2"],
                        ["--run-after", "0"], timeout=60)
    assert run.dst_rc == 0, run.dst_err
    metrics = tmp_path / "dst.json"
    out = tmp_path / "out.png"
    proc = plot(str(metrics), str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 10_000
    # The destination writes [t, bulk_placed, urgent_placed]; the older shape is [t, placed].
    m = json.loads(metrics.read_text())
    assert all(len(sample) == 3 for sample in m["placed_timeline"])
    m["placed_timeline"] = [[t, bulk + urgent] for t, bulk, urgent in m["placed_timeline"]]
    split = tmp_path / "split.json"
    split.write_text(json.dumps(m))
    assert plot(str(split), str(tmp_path / "split.png")).returncode == 0
    assert (tmp_path / "split.png").read_bytes().startswith(PNG)


def test_plot_mistakes_are_one_line_and_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main with an argv list): each mistake is found before matplotlib is needed."""
    assert main([str(tmp_path / "missing.json"), str(tmp_path / "out.png")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("migrate.plot: error: cannot read")
    assert lines[1].startswith("migrate.plot: hint: ")
    (tmp_path / "bad.json").write_text("{nope")
    assert main([str(tmp_path / "bad.json"), str(tmp_path / "out.png")]) == 1
    err = capsys.readouterr().err
    assert "is not JSON" in err and "hint:" in err
    assert main([]) == 2
