"""Snapshots: saved and loaded back, the memory image proven by replay, every broken file one line."""

from __future__ import annotations

import json
import mmap
import subprocess
from pathlib import Path

import pytest
import trio

from helpers import BIN
from migrate._native import ffi, lib
from migrate.errors import UsageError
from migrate.guest import GuestSpec, Workload, replay
from migrate.memory import Memory
from migrate.snapshot import load, load_state, take
from migrate.uffd import PAGE_SIZE


def file_digest(path: Path, pages: int) -> int:
    """The guest digest of a memory image, computed by C over the file mapped read-only."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m, ffi.from_buffer(m) as buf:
        return lib.guest_digest(int(ffi.cast("uintptr_t", buf)), pages)


@pytest.mark.parametrize("memory", [Memory.anon, Memory.memfd])
async def test_save_then_load_gives_the_guest_back(tmp_path: Path, memory: Memory) -> None:
    spec = GuestSpec(pages=2048, vcpus=3, workload=Workload.uniform, seed=7, zero_permille=300, rate=0,
                     memory=memory)
    with trio.fail_after(30):
        saved = await take(tmp_path / "snap", spec, 0.2)
        loaded = load(tmp_path / "snap")
        assert loaded.spec == spec and loaded.cpu == saved.cpu and all(s > 0 for s in loaded.steps())
        assert loaded.memory_path.stat().st_size == spec.size
        digest = await trio.to_thread.run_sync(file_digest, loaded.memory_path, spec.pages)
        want_digest, want_state = await trio.to_thread.run_sync(replay, spec, loaded.steps())
    assert digest == want_digest
    assert list(loaded.cpu) == want_state  # the read hashes too


async def test_a_broken_snapshot_is_one_line_naming_the_file(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    with trio.fail_after(30):
        await take(snap, GuestSpec(pages=64, vcpus=2), 0)
    state = json.loads((snap / "state.json").read_text())

    def broken(change: dict | str) -> str:
        (snap / "state.json").write_text(change if isinstance(change, str) else json.dumps({**state, **change}))
        with pytest.raises(UsageError) as info:
            load(snap)
        assert "\n" not in str(info.value) and info.value.hint
        return str(info.value)

    assert broken("{not json").startswith(f"{snap / 'state.json'} is not a snapshot's state: ")
    assert "not a JSON object" in broken("[1]")
    assert '"format" is 2, not 1' in broken({"format": 2})
    assert 'no "seed"' in broken(json.dumps({k: v for k, v in state.items() if k != "seed"}))
    assert '"pages" is not a whole number' in broken({"pages": "64"})
    assert '"workload" \'busy\' is none of' in broken({"workload": "busy"})
    assert '"memory" \'disk\' is none of' in broken({"memory": "disk"})
    assert "the guest needs at least one page" in broken({"pages": 0})
    assert '"cpu" is not a list of 2 vCPU states' in broken({"cpu": [[1, 2, 3]]})
    assert '"cpu"[1] is not [prng, steps, acc]' in broken({"cpu": [[1, 2, 3], [1, 2, -3]]})
    assert "memory holds 262144 bytes; " in broken({"pages": 64 * 2})
    # what was saved still loads
    (snap / "state.json").write_text(json.dumps(state))
    assert load(snap).spec.pages == 64
    (snap / "memory").write_bytes(b"\0" * PAGE_SIZE)
    with pytest.raises(UsageError, match=r"memory holds 4096 bytes; .*state.json describes a guest of 262144"):
        load(snap)
    assert load_state(snap).spec.pages == 64  # a VMM reads state.json alone
    (snap / "memory").unlink()
    with pytest.raises(UsageError, match="cannot read .*memory: No such file"):
        load(snap)
    (snap / "state.json").unlink()
    with pytest.raises(UsageError, match="cannot read .*state.json: No such file"):
        load_state(snap)


def test_migrate_snapshot_command(tmp_path: Path) -> None:
    out = subprocess.run([BIN / "migrate-snapshot", tmp_path / "s", "--guest-pages", "512", "--vcpus", "1",
                          "--workload", "sequential", "--seed", "3", "--seconds", "0.1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == ""
    assert out.stderr.startswith(f"migrate-snapshot: saved {tmp_path / 's'}: a 2 MiB anon guest, 1 vCPUs, "
                                 "sequential, seed 3, stopped at steps [")
    assert len(out.stderr.splitlines()) == 1
    snap = load(tmp_path / "s")
    assert snap.spec == GuestSpec(pages=512, vcpus=1, workload=Workload.sequential, seed=3)
    bad = subprocess.run([BIN / "migrate-snapshot", tmp_path / "t", "--vcpus", "0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == ["migrate-snapshot: error: --vcpus must be between 1 and 256, not 0",
                                       "migrate-snapshot: hint: each vCPU is a thread with a slice of guest memory"]
