"""The docker-compose demo, end to end: scripts/docker-demo must migrate and verify.

The script installs and starts Docker when it has to, so a machine without
Docker is a reason to fail, not to skip: the failure shows the script's own
explanation (the tail of its output). About 20 s with the base image cached,
about 90 s without it (debootstrap), plus the apt install on a new machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from migrate.stats import DestinationStats

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "docker-demo"
# The script bounds the compose run itself (DEMO_TIMEOUT); this is for a hang
# elsewhere, such as an apt lock held by another process.
TIMEOUT_S = 15 * 60


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.docker
@pytest.mark.timeout(TIMEOUT_S + 60)  # its own bound below names what hung
@pytest.mark.parametrize("tls,restore", [("0", "0"), ("1", "0"), ("0", "1")], ids=["plaintext", "tls", "restore"])
def test_docker_demo_migrates_and_verifies(tls: str, restore: str) -> None:
    """The migration, in plaintext and TLS; and the restore variant (RESTORE=1): a snapshot served from its
    memory file, restored in the VMM stand-in through migrate-dst --handoff, in one container."""
    env = dict(os.environ, TLS=tls, RESTORE=restore)
    # Small and quick: the demo shows the plumbing; speed is measured elsewhere.
    env.setdefault("GUEST_MIB", "64")
    env.setdefault("RUN_BEFORE", "1")
    env.setdefault("RUN_AFTER", "1")
    # Build the wheels with this interpreter when it matches the image's Python
    # (3.11, Debian bookworm); otherwise the script looks for `python3`.
    if sys.version_info[:2] == (3, 11):
        env.setdefault("PYTHON", sys.executable)
    try:
        proc = subprocess.run(
            [str(DEMO)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        pytest.fail(f"scripts/docker-demo ran over {TIMEOUT_S} s:\n{_tail(out)}")

    assert proc.returncode == 0, (
        f"scripts/docker-demo exited with {proc.returncode}:\n{_tail(proc.stdout)}"
    )
    assert "verified: yes" in proc.stdout, (
        f"the destination did not print 'verified: yes':\n{_tail(proc.stdout)}"
    )
    metrics = DestinationStats.from_json(json.loads((ROOT / "dist" / "docker-demo" / "metrics.json").read_text()))
    assert metrics.tls.startswith("TLSv1.3") == (tls == "1"), metrics.tls
    if restore == "1":  # the handler's metrics name the VMM that proved the guest
        vmm = json.loads((ROOT / "dist" / "docker-demo" / "vmm.json").read_text())
        assert vmm["verified"] is True and metrics.vmm_pid > 0
        assert "handed over 1 region" in proc.stdout, _tail(proc.stdout)
