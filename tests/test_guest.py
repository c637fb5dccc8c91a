"""The deterministic guest: replay is exact, CPU state travels whole."""

from __future__ import annotations

import time

import pytest

from migrate.errors import UsageError
from migrate.guest import Guest, GuestSpec, Workload, replay


@pytest.mark.parametrize("workload", list(Workload))
def test_replay_digest_equals_live_run(workload: Workload) -> None:
    spec = GuestSpec(pages=2048, vcpus=3, workload=workload, seed=7)
    g = Guest(spec, fill=True)
    g.start()
    time.sleep(0.05)
    g.stop()
    steps = g.steps()
    assert all(s > 0 for s in steps)
    assert replay(spec, steps) == (g.digest(), g.export_state())
    g.close()


def test_cpu_state_round_trip_continues_the_same_run() -> None:
    """Run, stop, move the state to a second guest with the same memory, finish there == one run."""
    spec = GuestSpec(pages=512, vcpus=2, workload=Workload.uniform, seed=3)
    a = Guest(spec, fill=True)
    a.start(max_steps=[10_000, 20_000])
    a.join()
    b = Guest(spec, fill=True)
    b.start(max_steps=[10_000, 20_000])  # same memory contents as a
    b.join()
    b.import_state(a.export_state())
    assert b.export_state() == a.export_state()
    b.start(max_steps=[15_000, 25_000])
    b.join()
    assert replay(spec, [15_000, 25_000]) == (b.digest(), b.export_state())
    a.close()
    b.close()


def test_different_steps_give_different_digests() -> None:
    spec = GuestSpec(pages=64, vcpus=1, workload=Workload.uniform)
    assert replay(spec, [1000])[0] != replay(spec, [1001])[0]


def test_zero_fraction_leaves_zero_pages() -> None:
    spec = GuestSpec(pages=4096, vcpus=1, zero_permille=500)
    g = Guest(spec, fill=True)
    out, zeros = bytearray(4096 * 4096), bytearray(4096)
    g.read_pages(0, 4096, out, zeros)
    assert 0.35 < sum(zeros) / 4096 < 0.65
    g.close()


@pytest.mark.parametrize("kwargs", [{"pages": 0}, {"pages": 2, "vcpus": 3}, {"pages": 8, "zero_permille": 1001}])
def test_impossible_guests_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        GuestSpec(**kwargs)
