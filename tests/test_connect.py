"""The destination's one back-off, on trio's autojump clock (no socket, no thread)."""

from __future__ import annotations

import pytest
import trio

from migrate.destination.connect import FIRST_RETRY, MAX_RETRY, Backoff


async def test_pauses_double_up_to_the_cap_and_the_last_attempt_starts_just_before_the_deadline(
        autojump_clock: trio.abc.Clock) -> None:
    t0 = trio.current_time()
    backoff = Backoff(t0 + 5.0)
    pauses = []
    while not backoff.exhausted:
        before = trio.current_time()
        await backoff.pause()
        pauses.append(round(trio.current_time() - before, 6))
    assert pauses[:5] == [FIRST_RETRY, 2 * FIRST_RETRY, 4 * FIRST_RETRY, 8 * FIRST_RETRY, 16 * FIRST_RETRY]
    assert max(pauses) == MAX_RETRY
    # Near the deadline each pause is half of what is left: no attempt is lost a back-off step early.
    assert pauses[-1] < FIRST_RETRY and backoff.left() < FIRST_RETRY
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=FIRST_RETRY)
    assert backoff.elapsed() == pytest.approx(trio.current_time() - t0)


async def test_a_deadline_already_near_allows_no_attempt(autojump_clock: trio.abc.Clock) -> None:
    assert Backoff(trio.current_time() + FIRST_RETRY / 2).exhausted
    assert not Backoff(trio.current_time() + 1.0).exhausted
