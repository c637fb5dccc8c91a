"""Pre-paging policies (migrate.prepage): alone, windows in and out; then a real migration per policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPORT, migrate
from migrate import prepage
from migrate.ranges import Remaining


def drain(policy: prepage.Policy, pages: int, limit: int, faults: dict[int, tuple[int, int]] | None = None,
          ) -> list[tuple[int, int]]:
    """Every window the policy gives until nothing is left; ``faults`` maps a window number to a fault
    reported before it (its pages leave the stream, as the request server's notes do)."""
    remaining, windows = Remaining([(0, pages)]), []
    for i in range(10 * pages):  # bounded: each window takes at least one page
        if faults and i in faults:
            start, count = faults[i]
            remaining.discard(start, count)
            policy.fault(start, count)
        runs = policy.next_window(remaining, limit)
        if not runs:
            return windows
        assert sum(n for _, n in runs) <= limit
        windows += runs
    raise AssertionError("the policy never finished")


@pytest.mark.parametrize("name", prepage.POLICIES)
def test_every_policy_sends_every_page_once(name: str) -> None:
    faults = {0: (700, 1), 3: (100, 2), 4: (103, 1), 5: (990, 1), 9: (5, 1), 12: (500, 4)}
    sent = [p for s, n in drain(prepage.make(name), 1000, 32, faults) for p in range(s, s + n)]
    requested = {p for s, n in faults.values() for p in range(s, s + n)}
    assert len(sent) == len(set(sent))  # a page requested after it was streamed went both ways, once each
    assert set(sent) | requested == set(range(1000))


def test_none_goes_in_address_order_whatever_faults() -> None:
    windows = drain(prepage.make("none"), 100, 10, {1: (50, 1)})
    assert windows[:3] == [(0, 10), (10, 10), (20, 10)]


def test_jump_goes_on_after_the_requested_run() -> None:
    windows = drain(prepage.make("jump"), 100, 10, {1: (50, 2)})
    assert windows[:3] == [(0, 10), (52, 10), (62, 10)]


def test_bubble_alternates_forward_and_backward_from_the_fault() -> None:
    windows = drain(prepage.make("bubble"), 1000, 10, {1: (500, 1)})
    assert windows[:5] == [(0, 10), (501, 10), (490, 10), (511, 10), (480, 10)]


def test_adaptive_follows_a_trend_in_chunks_that_grow() -> None:
    """Faults stepping down a region: the zone is swept downward from its front, a chunk first and
    twice that next, and address order fills the rest of each window."""
    policy, remaining = prepage.make("adaptive"), Remaining([(0, 10_000)])
    for page in (5000, 4990, 4980, 4970):
        remaining.discard(page, 1)
        policy.fault(page, 1)
    chunk = prepage.Adaptive.MIN_CHUNK
    assert policy.next_window(remaining, 256) == [(4970 - chunk, chunk), (0, 256 - chunk)]
    assert policy.next_window(remaining, 256)[0] == (4970 - 3 * chunk, 2 * chunk)


def test_adaptive_follows_every_scanning_vcpu_at_once() -> None:
    policy, remaining = prepage.make("adaptive"), Remaining([(0, 100_000)])
    for step in range(3):
        for base in (10_000, 60_000):  # two vCPUs, each stepping a page at a time
            remaining.discard(base + step, 1)
            policy.fault(base + step, 1)
    runs = policy.next_window(remaining, 256)
    assert (10_003, prepage.Adaptive.MIN_CHUNK) in runs and (60_003, prepage.Adaptive.MIN_CHUNK) in runs


def test_adaptive_does_not_chase_faults_without_a_trend() -> None:
    """Faults all over the place (a uniform guest): the stream stays in address order."""
    policy, remaining = prepage.make("adaptive"), Remaining([(0, 1 << 20)])
    for i in range(200):
        page = (i * 7919 * 104729) % (1 << 20)
        remaining.discard(page, 1)
        policy.fault(page, 1)
    runs = policy.next_window(remaining, 256)
    assert runs[0][0] == 1 and sum(n for _, n in runs) == 256  # page 0 faulted: from page 1 on
    assert policy.statistics()["zone_pages"] == 0


def test_a_policy_keeps_no_state_per_page() -> None:
    """Thousands of faults later, the adaptive policy still holds a handful of zones of bounded size."""
    policy = prepage.make("adaptive")
    remaining = Remaining([(0, 1 << 20)])
    for i in range(5000):
        page = (i * 7919) % (1 << 20)
        remaining.discard(page, 1)
        policy.fault(page, 1)
        policy.next_window(remaining, 16)
    assert len(policy.zones) <= prepage.Adaptive.ZONES
    assert all(len(z.strides) <= prepage.Adaptive.STRIDES for z in policy.zones)


async def test_policies_fault_less_than_address_order_on_a_sequential_guest(tmp_path: Path) -> None:
    """A sequential guest at a realistic pace, its stream capped so that it takes a second: a policy
    that follows the faults keeps ahead of both vCPUs; address order reaches the second one's scan
    only half-way through, and it faults on every page until then."""
    faults = {}
    for name in prepage.POLICIES:
        run = await migrate(tmp_path, ["--guest-mib", "32", "--workload", "sequential", "--rate", "25000",
                                       "--max-bandwidth", "20M", "--prepage", name, "--run-before", "0.3"],
                            ["--verify", "--run-after", "0.1"], timeout=25)
        assert run.dst_rc == 0 and run.src_rc == 0, run.dst_err + run.src_err
        assert run.dst_metrics.verified is True
        assert run.src_metrics.prepage == name
        faults[name] = run.dst_metrics.faults
    REPORT.append(f"sequential guest, faults per --prepage policy: {faults}")
    for name in ("jump", "bubble", "adaptive"):
        assert faults[name] * 3 < faults["none"], faults
