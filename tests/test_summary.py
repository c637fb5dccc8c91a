"""The summary's figures agree, or it says why they differ."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

from migrate.metrics import StallHistogram
from migrate.stats import DestinationStats
from migrate.summary import print_summary

# A real migration's statistics (a postcopy one, its link cut once), for the figures a test leaves alone.
SAMPLE = DestinationStats.from_json(json.loads((Path(__file__).parent / "data" / "dst-metrics.json").read_text()))


def metrics(faults: int, stalls: int, slow_other: int = 0) -> DestinationStats:
    h = StallHistogram(slow_other=slow_other, slow_other_ns=slow_other * 5000)
    for _ in range(stalls):
        h.add(40_000)
    return replace(SAMPLE, vcpu_stall_us=h.summary(), faults=faults, requests=faults)


def summary(m: DestinationStats) -> list[str]:
    out = io.StringIO()
    print_summary(m, out)
    return out.getvalue().splitlines()


def line(lines: list[str], head: str) -> str:
    """The line starting with ``head``, with its continuation lines."""
    i = next(i for i, x in enumerate(lines) if x.startswith(head))
    j = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")), len(lines))
    return " ".join(x.strip() for x in lines[i:j])


def test_equal_counts_say_one_per_fault() -> None:
    lines = summary(metrics(faults=100, stalls=100))
    assert line(lines, "vCPU stalls").endswith("(one per fault)")
    assert line(lines, "faults").split()[1] == "100"
    assert not any(x.startswith("not stalls") for x in lines)


def test_fewer_stalls_than_faults_are_explained() -> None:
    lines = summary(metrics(faults=5814, stalls=5800))
    stalls = line(lines, "vCPU stalls")
    assert stalls.startswith("vCPU stalls      5800 accesses waited for a page, p50 ")
    assert stalls.endswith("(faults 5814: for the other 14 the page arrived before the vCPU went to sleep)")


def test_more_stalls_than_faults_are_explained() -> None:
    lines = summary(metrics(faults=832, stalls=838))
    assert line(lines, "vCPU stalls").endswith("(faults 832: the bulk stream woke 6 vCPU waits before their fault "
                                               "was read)")


def test_summary_fits_a_terminal() -> None:
    assert max(len(x) for x in summary(metrics(faults=5814, stalls=5800, slow_other=99_999))) <= 110


def test_slow_accesses_that_did_not_wait_are_shown_apart() -> None:
    lines = summary(metrics(faults=10, stalls=10, slow_other=487))
    assert "10 accesses waited" in line(lines, "vCPU stalls")
    assert line(lines, "not stalls").startswith("not stalls       487 slow accesses (2.4 ms) that never slept for a page")
    assert lines[-1] == "verified: yes"
