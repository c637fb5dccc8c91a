"""--max-bandwidth: the rate's forms, its usage errors, and a capped stream that takes as long as it should.

The precise figure (within 5% over any 1 s window) is measured by scripts/bench-links; here the
tolerance is wide, as this machine is shared.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from helpers import REPORT, migrate
from migrate.cli import parse_rate
from migrate.wire import URGENT_PRIORITY, URGENT_TOS, mark_urgent


@pytest.mark.parametrize("text,rate", [
    ("500M", 500_000_000), ("1G", 10**9), ("64K", 64_000), ("12345", 12345), ("1.5G", 1_500_000_000),
    ("1Gbit", 125_000_000), ("10Gbit/s", 1_250_000_000), ("100Mbps", 12_500_000), ("500MB/s", 500_000_000),
    ("2MB", 2_000_000), ("8b/s", 1),
])
def test_rates_are_bytes_per_second_with_powers_of_1000(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "-5M", "0", "1T", "nanM", "infG", "3bit"])
def test_nonsense_rates_are_refused(text: str) -> None:
    with pytest.raises((ValueError, IndexError)):
        parse_rate(text)


def test_a_bad_rate_is_one_line_and_a_hint(cli) -> None:
    proc = cli("migrate-src", "--max-bandwidth", "fast")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert "--max-bandwidth: 'fast' is not a rate" in lines[0] and lines[1].startswith("migrate-src: hint: ")
    assert "bytes per second" in cli("migrate-src", "--help").stdout


async def test_a_capped_stream_takes_as_long_as_the_cap_says(tmp_path: Path) -> None:
    """64 MiB of non-zero pages at 50 MB/s: 1.34 s at the cap; 1.0-2.5 s allows for a busy machine."""
    result = await migrate(tmp_path, ["--guest-mib", "64", "--zero-fraction", "0", "--workload", "readmostly",
                                      "--rate", "1", "--max-bandwidth", "50M", "--run-before", "0.2"],
                           ["--verify", "--run-after", "0.1"], timeout=25)
    assert result.dst_rc == 0 and result.src_rc == 0, result.dst_err + result.src_err
    m, s = result.dst_metrics, result.src_metrics
    assert m.verified is True
    REPORT.append(f"64 MiB capped at 50 MB/s: streamed in {m.total_s:.2f} s, {s.pacer_waits} pauses")
    assert 1.0 <= m.total_s <= 2.5, m.total_s
    assert s.max_bandwidth_bytes_per_s == 50_000_000 and s.pacer_waits > 0


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
async def test_urgent_connections_are_marked_for_a_bottleneck_to_serve_first(family: int) -> None:
    """Requests and replies carry DSCP EF (and the interactive priority); a bottleneck that honours
    DiffServ serves them ahead of the stream (scripts/bench-links measures the difference)."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    with sock:
        mark_urgent(sock)
        if family == socket.AF_INET6:
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS) == URGENT_TOS
        else:
            assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == URGENT_TOS
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == URGENT_PRIORITY


async def test_the_cap_holds_precopy_rounds_too(tmp_path: Path) -> None:
    """Hybrid: the first round sends every page while the guest runs, at the cap like the postcopy stream."""
    result = await migrate(tmp_path, ["--guest-mib", "64", "--zero-fraction", "0", "--workload", "readmostly",
                                      "--rate", "1", "--max-bandwidth", "50M", "--run-before", "0.2",
                                      "--mode", "hybrid"], ["--verify", "--run-after", "0.1"], timeout=25)
    assert result.dst_rc == 0 and result.src_rc == 0, result.dst_err + result.src_err
    s = result.src_metrics
    assert result.dst_metrics.verified is True
    first = s.rounds[0]
    assert first.pages == 16384 and 1.0 <= first.seconds <= 2.5, first
