"""The attack suite's quick subset (tests/attack.py), one case per test: hostile peers generated from the
protocol's order table against real migrate-src and migrate-dst processes.  ``scripts/attack`` runs all of
them (and prints the table); a case's name reads role/STATE/channel/attack/transport/mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

import attack

CASES, _ = attack.select_cases(full=False, patterns=[])


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> attack.Env:
    """Certificates (ours and another CA's) and a key, made once for the whole run."""
    return attack.Env.make(Path(tmp_path_factory.mktemp("attack")))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_attack(case: attack.Case, env: attack.Env) -> None:
    if case.attack == "vanish" and os.geteuid() != 0:
        pytest.skip("vanish needs network namespaces of our own: root")
    with trio.fail_after(attack.unit_limit([case])):
        [result] = await attack.run_unit([case], env)
    assert not result.failed, f"{case.name}: " + "; ".join(result.reasons)


def test_every_state_of_the_table_has_a_row() -> None:
    """No silent gap: each state of TABLE is attacked, or pruned with a reason, on each of its channels."""
    cases, skipped = attack.generate(full=True)
    rows = {(c.role, c.state, c.channel) for c in cases} | {(c.role, c.state, c.channel) for c, _ in skipped}
    for role in ("src", "dst"):
        for state in attack.State:
            for ch in attack.channels(state):
                assert (role, state, ch) in rows, (role, state, ch)
    assert all(why for _, why in skipped)
