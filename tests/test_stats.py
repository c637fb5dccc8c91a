"""The statistics are the schema of the metrics JSON: typed, frozen, and written as before they had types."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from helpers import migrate
from migrate.stats import DestinationStats, LatencySummary, Recovery, Round, SourceStats, StallSummary

# Metrics files as migrate-dst and migrate-src wrote them before the statistics had types
# (commit 722101f), byte for byte: a postcopy migration whose links were cut once, and a
# hybrid one cut during its first round (so one round was sent again and one discarded).
DATA = Path(__file__).parent / "data"
SAMPLES = [(DestinationStats, "dst-metrics.json"), (SourceStats, "src-metrics.json")]


def keys(value: object, at: str = "") -> set[str]:
    """The key paths of a JSON object, nested objects included (not inside lists: those may be empty)."""
    if not isinstance(value, dict):
        return set()
    return {path for k, v in value.items() for path in {at + k} | keys(v, f"{at}{k}.")}


@pytest.mark.parametrize(("cls", "name"), SAMPLES)
def test_the_json_is_written_as_before_byte_for_byte(cls: type, name: str) -> None:
    text = (DATA / name).read_text()
    stats = cls.from_json(json.loads(text))
    written = json.dumps(stats.to_json(), sort_keys=True)
    assert written + "\n" == text
    assert cls.from_json(json.loads(written)) == stats  # and back: typed, JSON, the same typed object


def test_from_json_rebuilds_the_nested_statistics() -> None:
    dst = DestinationStats.from_json(json.loads((DATA / "dst-metrics.json").read_text()))
    assert isinstance(dst.vcpu_stall_us, StallSummary) and isinstance(dst.hops_us.network, LatencySummary)
    assert dst.recoveries == (Recovery(reconnect_s=0.013, pages_missing=8446),)
    src = SourceStats.from_json(json.loads((DATA / "src-metrics.json").read_text()))
    resent, discarding = src.rounds
    assert isinstance(resent, Round) and resent.resent_after_recovery and resent.discarded is None
    assert discarding.discarded == 16384 and not discarding.resent_after_recovery
    assert src.first_window is not None and src.first_window.pages == 2048
    with pytest.raises(FrozenInstanceError):
        dst.faults = 0


def test_from_json_names_a_missing_key() -> None:
    data = json.loads((DATA / "src-metrics.json").read_text())
    del data["switchover"]["dirty_pages"]
    with pytest.raises(KeyError, match="dirty_pages"):
        SourceStats.from_json(data)


async def test_a_migration_writes_the_keys_written_before(tmp_path: Path) -> None:
    run = await migrate(tmp_path, ["--guest-mib", "16", "--run-before", "0.3"], ["--run-after", "0"])
    assert run.dst_rc == 0 and run.src_rc == 0, run.dst_err + run.src_err
    for (cls, name), written in zip(SAMPLES, ("dst.json", "src.json")):
        data = json.loads((tmp_path / written).read_text())
        assert keys(data) == keys(json.loads((DATA / name).read_text()))
        assert cls.from_json(data).to_json() == data
