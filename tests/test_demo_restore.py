"""scripts/demo-restore end to end: a small busy guest snapshotted, restored in a VMM stand-in through
migrate-dst --handoff and migrate-src --memory-file over 127.0.0.1, and proven by replay."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_restore_ends_verified(tmp_path: Path) -> None:
    env = dict(os.environ, GUEST_MIB="32", RUN_BEFORE="0.3", RUN_AFTER="0.3", KEEP=str(tmp_path))
    proc = subprocess.run([str(ROOT / "scripts" / "demo-restore")], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr
    assert proc.returncode == 0, err
    lines = err.splitlines()
    assert lines[-1] == "verified: yes", err
    assert "── restore summary" in err and "first vCPU step" in err, err
    # The restore went through the handoff and the memory file, not a guest of the handler's own.
    assert "handed over 1 region" in err and "serving the memory image" in err, err
    assert (tmp_path / "vmm.json").exists() and (tmp_path / "dst.json").exists()
    assert "Traceback" not in err


def test_demo_restore_refuses_an_argument() -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "demo-restore"), "--bogus"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "scripts/demo-restore: error: unknown argument --bogus"
