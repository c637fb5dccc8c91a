"""A short soak inside the test suite: about 90 s of migrations with every kind of injected fault.

scripts/soak runs the same for longer (30 minutes by default); tests/soak.py says what each fault
is and what counts as a problem.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

import soak
from helpers import REPORT

MINUTES = 1.5


async def test_short_soak_finds_no_problem(tmp_path: Path) -> None:
    seed = random.randrange(2**32)  # a new sample every time; the seed replays it (scripts/soak --seed)
    # Bounded twice over: each run by soak.RUN_BUDGET_S, the whole here.
    with trio.fail_after(MINUTES * 60 + len(soak.FAULTS) * soak.RUN_BUDGET_S):
        outcomes = await soak.soak(MINUTES, seed, tmp_path, say=lambda line: None)
    summary = soak.table(outcomes)
    REPORT.append(f"soak: {len(outcomes)} runs in {MINUTES:g} minutes (seed {seed}):\n{summary}")
    assert {o.plan.fault for o in outcomes} == set(soak.FAULTS)
    assert {o.plan.fault for o in outcomes if o.injected} == set(soak.FAULTS) - {"none"}  # dealt and struck
    assert any(o.plan.tls for o in outcomes)
    problems = [o.line() for o in outcomes if o.problems]
    assert not problems, "\n".join([f"seed {seed}, files in {tmp_path}", *problems, summary])
