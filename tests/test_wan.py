"""A migration over the emulated WAN link (bench/wan.py): real namespaces, veths, htb, the delay forwarder.

Needs root (skipped otherwise, saying so).  Correctness only: the guest
verifies, the link's delay shows in the urgent path, and nothing of the link
is left behind.  How fast it goes is scripts/bench-links' business.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from helpers import BIN, REPORT
from migrate.stats import DestinationStats

import wan  # bench/ is on the test path (pyproject.toml)


@pytest.fixture
def link_possible() -> None:
    """Namespaces need root: skipped without it, but never in CI (root there), where that is a failure."""
    try:
        wan.check()
    except wan.LinkUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no emulated link in CI: {exc}")
        pytest.skip(f"no emulated link here: {exc}")


def test_link_spec_parses_rate_and_rtt() -> None:
    assert wan.LinkSpec.parse("1Gbit,1ms") == wan.LinkSpec(1e9, 1.0)
    assert wan.LinkSpec.parse("10G,0.1ms").name == "10Gbit,0.1ms"
    assert wan.LinkSpec.parse("100Mbit,500us").rtt_ms == 0.5
    with pytest.raises(ValueError):
        wan.LinkSpec.parse("fast,1ms")


@pytest.mark.usefixtures("link_possible")
def test_a_migration_over_a_shaped_delayed_link_verifies(tmp_path: Path) -> None:
    from linkbench import Migration, guest_args

    spec = wan.LinkSpec.parse("1Gbit,4ms")
    with wan.emulated_link(spec) as link:
        run = Migration(BIN / "python", link, tmp_path).run(
            [*guest_args("hotset", 32, 25000), "--run-before", "0.3", "--prepage", "adaptive",
             "--max-bandwidth", "100M"], ["--verify", "--run-after", "0.1"], timeout=25)
        names = {link.src_ns, link.dst_ns, link.wire_ns}
    d = DestinationStats.from_json(run["dst"])
    assert d.verified is True and d.pages_placed == d.pages_total
    # Every request and its reply crossed the forwarder: at least the round trip it adds.
    assert d.faults > 0 and d.hops_us.network.p50 >= 4000 * 0.95
    fwd = link.forwarder
    assert fwd["a_to_b"]["frames"] > 0 and fwd["b_to_a"]["frames"] > 0
    assert fwd["a_to_b"]["drops_other"] == fwd["b_to_a"]["drops_other"] == 0
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in left for name in names), left
    REPORT.append(f"over an emulated 1 Gbit/s, 4 ms link: {d.faults} faults, request->reply p50 "
                  f"{d.hops_us.network.p50:.0f} us, verified")


@pytest.mark.usefixtures("link_possible")
async def test_a_source_host_that_vanishes_before_the_switchover_is_noticed(tmp_path: Path) -> None:
    """Power loss or a dropped route sends no FIN and no RST: the link's middle goes down while the
    destination waits for the switchover (--run-before 60).  Keepalive and TCP_USER_TIMEOUT end the
    silent wait within --link-timeout; reconnecting fails for --reconnect-timeout; then one line and
    exit 1 (the destination once waited for ever)."""
    key = tmp_path / "key"
    key.write_text("a secret for a non-loopback address\n")
    ready, dst_err = tmp_path / "ready", tmp_path / "dst.err"
    with wan.emulated_link(wan.LinkSpec.parse("10Gbit,0.1ms")) as link:
        src = await trio.lowlevel.open_process(
            [*link.exec_in("src"), str(BIN / "migrate-src"), "--listen", f"{link.src_addr}:0", "--key-file", str(key),
             "--guest-mib", "8", "--run-before", "60", "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with trio.fail_after(30):
                while not (ready.exists() and ready.read_text().strip()):
                    await trio.sleep(0.05)
                port = ready.read_text().strip().rpartition(":")[2]
                with open(dst_err, "w") as err:
                    dst = await trio.lowlevel.open_process(
                        [*link.exec_in("dst"), str(BIN / "migrate-dst"), "--connect", f"{link.src_addr}:{port}",
                         "--key-file", str(key), "--link-timeout", "2", "--reconnect-timeout", "2"],
                        stdout=subprocess.DEVNULL, stderr=err)
                while "waiting for switchover" not in dst_err.read_text():
                    assert dst.poll() is None, dst_err.read_text()
                    await trio.sleep(0.05)
            subprocess.run(["ip", "-n", link.wire_ns, "link", "set", "ws", "down"], check=True)
            t0 = trio.current_time()
            with trio.fail_after(20):
                rc = await dst.wait()
            waited = trio.current_time() - t0
        finally:
            for proc in (src, *([dst] if "dst" in locals() else [])):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    text = dst_err.read_text()
    errors = [line for line in text.splitlines() if ": error:" in line]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in text, text
    assert waited < 2 + 2 + 2 + 3, f"{waited:.1f} s: link timeout, reconnect timeout, one attempt, margin"
    REPORT.append(f"a source host vanished before the switchover: the destination ended after {waited:.1f} s "
                  f"(--link-timeout 2, --reconnect-timeout 2): {errors[0]}")
