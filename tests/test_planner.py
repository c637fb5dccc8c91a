"""The precopy rounds' planner and the modes' switchover plans, with no kernel, no socket and no trio.

Each test feeds the planner what a driver would (acknowledged rounds with
their pages, bytes and seconds; scans with the pages they found) and checks
its answer: another round, a discarding round, or the switchover, and why.
"""

from __future__ import annotations

import pytest

from migrate import protocol as p
from migrate.guest import GuestSpec
from migrate.source.config import SourceConfig, StreamOrder
from migrate.source.modes import Hybrid, Mode, Postcopy, Precopy, choose
from migrate.source.planner import NOT_CONVERGING, Next, Pages, RoundPlanner, SwitchoverPlan, Why

PAGE = 4096
GUEST = 10_000  # pages
# A round of the whole guest in one second: 40.96 MB/s, so 1 ms sends 10 pages.
ROUND_1 = dict(pages=GUEST, nbytes=GUEST * PAGE, seconds=1.0)


def planner(max_rounds: int = 10, switchover_ms: float = 5.0, when_stuck: Next = Next.DISCARD_ROUND) -> RoundPlanner:
    return RoundPlanner(GUEST, max_rounds=max_rounds, switchover_ms=switchover_ms, when_stuck=when_stuck,
                        page_size=PAGE)


def test_round_1_sends_every_page_and_an_acknowledged_round_asks_for_a_scan() -> None:
    plan = planner()
    assert (plan.round, plan.planned, plan.discarding) == (1, GUEST, False)
    assert plan.acknowledged(**ROUND_1).next is Next.SCAN


def test_another_round_carries_what_the_scan_found() -> None:
    plan = planner()
    plan.acknowledged(**ROUND_1)
    decision = plan.scanned(1000)
    assert (decision.next, decision.why) == (Next.ANOTHER_ROUND, Why.CONVERGING)
    assert decision.estimate_ms == pytest.approx(100.0)  # 1000 pages at 10 pages per ms
    assert decision.compared_with == GUEST
    assert (plan.round, plan.planned, plan.last) == (2, 1000, False)
    assert plan.acknowledged(pages=1000, nbytes=1000 * PAGE, seconds=0.1).next is Next.SCAN


def test_a_scan_short_enough_to_send_becomes_the_last_round() -> None:
    """The threshold is time at the rounds' rate, not pages: 50 pages take 5 ms here."""
    plan = planner(switchover_ms=5.0)
    plan.acknowledged(**ROUND_1)
    assert plan.scanned(50).next is Next.ANOTHER_ROUND
    assert plan.last
    decision = plan.acknowledged(pages=50, nbytes=50 * PAGE, seconds=0.005)
    assert (decision.next, decision.why) == (Next.SWITCH_OVER, Why.LAST_ROUND)


def test_just_over_the_threshold_is_not_the_last_round() -> None:
    plan = planner(switchover_ms=5.0)
    plan.acknowledged(**ROUND_1)
    plan.scanned(51)
    assert not plan.last
    assert plan.acknowledged(pages=51, nbytes=51 * PAGE, seconds=0.005).next is Next.SCAN


def test_the_estimate_follows_the_rate_of_all_the_rounds_in_bytes() -> None:
    """Zero pages cost a frame header, not a page: the rate is bytes sent per second, so they do not flatter it."""
    plan = planner()
    plan.acknowledged(pages=GUEST, nbytes=GUEST * PAGE // 2, seconds=1.0)  # half were zero pages
    assert plan.rate == pytest.approx(GUEST * PAGE / 2)
    assert plan.estimate_ms(1000) == pytest.approx(200.0)
    plan.scanned(1000)
    plan.acknowledged(pages=1000, nbytes=1000 * PAGE, seconds=1.0)  # a slow second round halves the rate again
    assert plan.rate == pytest.approx((GUEST * PAGE / 2 + 1000 * PAGE) / 2.0)


def test_nothing_written_switches_over_at_once() -> None:
    plan = planner()
    plan.acknowledged(**ROUND_1)
    decision = plan.scanned(0)
    assert (decision.next, decision.why, plan.round) == (Next.SWITCH_OVER, Why.CLEAN, 1)


def test_max_rounds_switches_over_after_the_last_allowed_round_without_a_scan() -> None:
    plan = planner(max_rounds=2)
    plan.acknowledged(**ROUND_1)
    plan.scanned(1000)
    decision = plan.acknowledged(pages=1000, nbytes=1000 * PAGE, seconds=0.1)
    assert (decision.next, decision.why) == (Next.SWITCH_OVER, Why.MAX_ROUNDS)


def test_one_round_at_most_means_round_1_then_the_switchover() -> None:
    decision = planner(max_rounds=1).acknowledged(**ROUND_1)
    assert (decision.next, decision.why) == (Next.SWITCH_OVER, Why.MAX_ROUNDS)


@pytest.mark.parametrize("when_stuck", [Next.DISCARD_ROUND, Next.SWITCH_OVER])
def test_just_under_the_convergence_bound_another_round_goes(when_stuck: Next) -> None:
    plan = planner(when_stuck=when_stuck)
    plan.acknowledged(**ROUND_1)
    assert plan.scanned(int(NOT_CONVERGING * GUEST) - 1).next is Next.ANOTHER_ROUND


def test_hybrid_not_converging_drops_the_pages_there_in_a_discarding_round_then_switches_over() -> None:
    plan = planner(when_stuck=Next.DISCARD_ROUND)
    plan.acknowledged(**ROUND_1)
    decision = plan.scanned(int(NOT_CONVERGING * GUEST))
    assert (decision.next, decision.why) == (Next.DISCARD_ROUND, Why.NOT_CONVERGING)
    assert (plan.round, plan.discarding) == (2, True)
    decision = plan.acknowledged(pages=0, nbytes=0, seconds=0.01)
    assert (decision.next, decision.why) == (Next.SWITCH_OVER, Why.DISCARDED)


def test_precopy_not_converging_switches_over_at_once() -> None:
    plan = planner(when_stuck=Next.SWITCH_OVER)
    plan.acknowledged(**ROUND_1)
    decision = plan.scanned(GUEST)
    assert (decision.next, decision.why, plan.round) == (Next.SWITCH_OVER, Why.NOT_CONVERGING, 1)


def test_convergence_is_judged_against_the_rounds_whole_set_after_a_partial_resend() -> None:
    """A round sent again after a lost link sends part of its set, but the guest wrote through all of it."""
    plan = planner(when_stuck=Next.SWITCH_OVER)
    plan.acknowledged(**ROUND_1)
    plan.scanned(2000)  # round 2 is to send 2000 pages
    plan.acknowledged(pages=500, nbytes=500 * PAGE, seconds=0.05)  # resent: only 500 were still needed
    decision = plan.scanned(1000)  # 1000 >= 0.8 * 500, but not >= 0.8 * 2000
    assert (decision.next, decision.compared_with) == (Next.ANOTHER_ROUND, 2000)


def test_a_round_that_sent_more_than_planned_is_judged_against_what_it_sent() -> None:
    plan = planner(when_stuck=Next.SWITCH_OVER)
    plan.acknowledged(**ROUND_1)
    plan.scanned(100)
    plan.acknowledged(pages=3000, nbytes=3000 * PAGE, seconds=0.3)  # resent with many absent pages
    assert plan.scanned(2000).compared_with == 3000


def test_a_last_round_still_ends_at_max_rounds_first() -> None:
    plan = planner(max_rounds=2, switchover_ms=1000.0)
    plan.acknowledged(**ROUND_1)
    plan.scanned(10)
    assert plan.last
    assert plan.acknowledged(pages=10, nbytes=10 * PAGE, seconds=0.001).why is Why.MAX_ROUNDS


# -- the switchover plans ------------------------------------------------------------------------------
def mode(kind: type[Mode], order: StreamOrder = StreamOrder.address) -> Mode:
    return kind(order)


def test_postcopy_sends_only_the_cpu_state_then_streams_every_page() -> None:
    assert mode(Postcopy).switchover(None, False) == SwitchoverPlan(send=True, stream=(Pages.EVERY,))


def test_postcopy_in_working_set_order_streams_the_working_set_first_once() -> None:
    m = mode(Postcopy, StreamOrder.working_set)
    assert m.switchover(None, False).first is Pages.WORKING_SET
    assert m.switchover(False, True) == SwitchoverPlan(send=True, stream=(Pages.ABSENT,))


def test_hybrid_discards_the_last_scan_and_postcopy_brings_the_final_set() -> None:
    plan = mode(Hybrid).switchover(None, False)
    assert plan == SwitchoverPlan(send=True, discard=Pages.LAST_SCAN, stream=(Pages.FINAL, Pages.ABSENT))


def test_hybrid_in_working_set_order_streams_the_last_scan_first_the_first_time_only() -> None:
    m = mode(Hybrid, StreamOrder.working_set)
    assert m.switchover(None, False).first is Pages.LAST_SCAN
    assert m.switchover(False, True).first is None


def test_precopy_copies_the_final_set_and_what_is_absent_with_the_vcpus_stopped_and_streams_nothing() -> None:
    for started in (None, False):
        assert mode(Precopy).switchover(started, False) == SwitchoverPlan(send=True, copy=(Pages.FINAL, Pages.ABSENT))


@pytest.mark.parametrize("kind", [Postcopy, Hybrid, Precopy])
def test_a_switchover_the_destination_confirmed_is_never_sent_again(kind: type[Mode]) -> None:
    assert mode(kind, StreamOrder.working_set).switchover(True, False) == SwitchoverPlan(send=False,
                                                                                         stream=(Pages.ABSENT,))


def test_choose_reads_the_mode_and_the_stream_order() -> None:
    spec = GuestSpec(pages=16, vcpus=1)
    for wire, kind in ((p.Mode.postcopy, Postcopy), (p.Mode.hybrid, Hybrid), (p.Mode.precopy, Precopy)):
        cfg = SourceConfig("127.0.0.1", 0, spec, mode=wire, stream_order=StreamOrder.working_set)
        assert choose(cfg) == kind(StreamOrder.working_set) and choose(cfg).wire is wire


def test_what_each_mode_tracks_and_does_when_rounds_stop_converging() -> None:
    assert not mode(Postcopy).tracks_writes and mode(Postcopy, StreamOrder.working_set).measures_working_set
    assert mode(Hybrid).rounds and mode(Hybrid).when_stuck is Next.DISCARD_ROUND
    assert mode(Precopy).rounds and mode(Precopy).when_stuck is Next.SWITCH_OVER
    assert not mode(Hybrid, StreamOrder.working_set).measures_working_set
