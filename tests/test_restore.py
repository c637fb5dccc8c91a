"""Restoring a snapshot lazily over TCP: migrate-src serves its memory file; migrate-dst fills either a guest of
its own or, through Firecracker's userfaultfd handoff (``--handoff``), the memory of a VMM (``migrate-vmm``, the
stand-in that does what Firecracker does and proves the restore by replay).

Real processes on 127.0.0.1 and a real Unix socket; every restore is proven by replay.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from helpers import BIN, REPORT, run_destination, start_source
from migrate.memory import HUGE_PAGE_SIZE
from test_memory import huge_pages  # noqa: F401 - a fixture
from test_modes import WORKLOADS

GUEST_MIB = 32


def snapshot(tmp: Path, *args: str, mib: int = GUEST_MIB) -> Path:
    """A snapshot of a guest that ran a moment (migrate-snapshot)."""
    out = tmp / "snapshot"
    subprocess.run([str(BIN / "migrate-snapshot"), str(out), "--guest-mib", str(mib), "--seconds", "0.3", "-q",
                    *args], check=True, timeout=60)
    return out


async def restore(tmp: Path, snap: Path, vmm_args: list[str], dst_args: list[str] = (),
                  source: Path | None = None) -> tuple[subprocess.CompletedProcess, int, str, dict]:
    """Serves ``source`` (default: ``snap``'s memory file) to migrate-dst --handoff, and restores ``snap`` in a
    migrate-vmm that hands its memory over; returns the VMM's run and the destination's code, stderr, metrics."""
    src, port = await start_source(tmp, ["--memory-file", str((source or snap) / "memory")])
    sock, metrics = tmp / "vmm.sock", tmp / "dst.json"
    with open(tmp / "dst.err", "w") as dst_err:  # the child keeps its own copy
        dst = await trio.lowlevel.open_process(
            [str(BIN / "migrate-dst"), "--connect", f"127.0.0.1:{port}", "--handoff", str(sock), "--metrics",
             str(metrics), *dst_args], stderr=dst_err)
    try:
        with trio.fail_after(120):
            while not sock.exists():
                assert dst.poll() is None, (tmp / "dst.err").read_text()
                await trio.sleep(0.02)
            vmm = await trio.run_process([str(BIN / "migrate-vmm"), "--snapshot", str(snap), "--handoff", str(sock),
                                          "--seconds", "0.5", "--metrics", str(tmp / "vmm.json"), *vmm_args],
                                         capture_stdout=True, capture_stderr=True, check=False)
        with trio.move_on_after(10):  # the VMM is done: so is the handler, or it never will be
            await dst.wait()
            await src.wait()
    finally:
        for proc in (src, dst):
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
    raw = json.loads(metrics.read_text()) if metrics.exists() else {}
    return vmm, dst.returncode, (tmp / "dst.err").read_text(), raw


def assert_restored(vmm: subprocess.CompletedProcess, dst_rc: int, dst_err: str, m: dict) -> None:
    err = vmm.stderr.decode()
    assert vmm.returncode == 0 and "verified: yes" in err, err + dst_err
    assert dst_rc == 0, dst_err
    assert m["pages_placed"] == m["pages_total"] and m["vmm_pid"] > 0
    assert f"verified: by the VMM (pid {m['vmm_pid']})" in dst_err
    assert "Traceback" not in err + dst_err


# Every workload on 4 KiB and on 2 MiB pages, and shared memory once; the regions and the message's version vary along (a huge page
# needs 1.7 or later: before, the message had no page size).
CASES = [(w, memory, regions, "1.7" if memory == "hugetlb" and version == "1.6" else version)
         for (w, regions, version) in zip(WORKLOADS, (1, 2, 3, 2), ("1.12", "1.7", "1.6", "1.12"))
         for memory in ("anon", "hugetlb")] + [("hotset", "memfd", 2, "1.12")]


@pytest.mark.parametrize("workload,memory,regions,version", CASES)
async def test_a_vmm_restores_a_snapshot_through_the_handoff(tmp_path: Path, workload: str, memory: str, regions: int,
                                                              version: str, request: pytest.FixtureRequest) -> None:
    if memory == "hugetlb":
        request.getfixturevalue("huge_pages")
    snap = snapshot(tmp_path, "--workload", workload, "--memory", memory)
    vmm, rc, err, m = await restore(tmp_path, snap, ["--regions", str(regions), "--firecracker", version])
    assert_restored(vmm, rc, err, m)
    assert m["page_size"] == (HUGE_PAGE_SIZE if memory == "hugetlb" else 4096)
    assert f"handed over {regions} region" in err
    v = json.loads((tmp_path / "vmm.json").read_text())
    REPORT.append(f"restore {workload:10} {memory:7} {regions} regions FC {version:4}: first vCPU step "
                  f"{v.get('first_step_ms')} ms after the handoff, {m['faults']} faults, {m['eexist']} -EEXIST, "
                  f"verified by the VMM")


@pytest.mark.parametrize("memory", ["anon", "memfd", "hugetlb"])
async def test_memory_the_vmm_removes_reads_as_zeros(tmp_path: Path, memory: str,
                                                     request: pytest.FixtureRequest) -> None:
    """The VMM drops ranges (MADV_DONTNEED / MADV_REMOVE, as a balloon does) while the stream fills its memory,
    much of which is still to come: no frame may put the image's bytes back there; the replay drops the same
    ranges, so the VMM's proof fails if one does.  What is still absent at the end is placed as zero pages."""
    if memory == "hugetlb":
        request.getfixturevalue("huge_pages")
    snap = snapshot(tmp_path, "--workload", "uniform", "--memory", memory)
    vmm, rc, err, m = await restore(tmp_path, snap, ["--regions", "2", "--remove", "40"])
    assert_restored(vmm, rc, err, m)
    assert m["vmm_removes"] >= 40 and m["vmm_removed_pages"] >= 40  # an event per region a range crosses
    assert "dropped 40 ranges" in vmm.stderr.decode()
    REPORT.append(f"restore with removes ({memory}): {m['vmm_removes']} removes of {m['vmm_removed_pages']} pages, "
                  f"{m.get('vmm_holes_zeroed', 0)} absent at the end placed as zero pages, verified by the VMM")


async def test_a_snapshot_served_from_its_memory_file_restores_in_migrate_dst(tmp_path: Path) -> None:
    """--memory-file without a VMM: migrate-dst maps the guest itself, runs it on, and proves it."""
    snap = snapshot(tmp_path, "--workload", "uniform")
    src, port = await start_source(tmp_path, ["--memory-file", str(snap / "memory")])
    with trio.fail_after(60):
        rc, err, m = await run_destination(tmp_path, port, ["--run-after", "0.3"])
        assert rc == 0 and m["verified"] is True, err
        assert await src.wait() == 0
    state = json.loads((snap / "state.json").read_text())
    assert m["vcpu_steps"] > [steps for _, steps, _ in state["cpu"]]  # it ran on from the snapshot's steps


async def test_the_vmm_must_hold_the_guest_the_source_serves(tmp_path: Path) -> None:
    """A VMM restoring another snapshot than the source serves is refused in one line; nothing is placed."""
    served = snapshot(tmp_path / "a", mib=GUEST_MIB)
    other = snapshot(tmp_path / "b", mib=GUEST_MIB // 2)
    vmm, rc, err, _ = await restore(tmp_path, other, ["--timeout", "3"], source=served)
    assert rc == 1 and vmm.returncode != 0
    assert [line for line in err.splitlines() if "error" in line] == [
        f"migrate-dst: error: the VMM's regions hold {GUEST_MIB // 2} MiB; the source serves a guest of "
        f"{GUEST_MIB} MiB"], err


async def test_a_vmm_that_exits_half_way_ends_the_restore_in_one_line(tmp_path: Path) -> None:
    """The VMM killed while its memory is still coming (a capped stream, a guest that touches little): one
    line, exit 1."""
    snap = snapshot(tmp_path, "--rate", "1000")
    src, port = await start_source(tmp_path, ["--memory-file", str(snap / "memory"), "--max-bandwidth", "4M"])
    sock = tmp_path / "vmm.sock"
    with trio.fail_after(60):
        dst = await trio.lowlevel.open_process(
            [str(BIN / "migrate-dst"), "--connect", f"127.0.0.1:{port}", "--handoff", str(sock)],
            stderr=subprocess.PIPE)
        while not sock.exists():
            await trio.sleep(0.02)
        vmm = await trio.lowlevel.open_process([str(BIN / "migrate-vmm"), "--snapshot", str(snap), "--handoff",
                                                str(sock), "--seconds", "30"], stderr=subprocess.DEVNULL)
        await trio.sleep(1.0)  # a quarter of the guest has come at 4 MB/s
        vmm.send_signal(signal.SIGKILL)
        await vmm.wait()
        err = (await dst.stderr.receive_some(1 << 16)).decode()
        while chunk := await dst.stderr.receive_some(1 << 16):
            err += chunk.decode()
        assert await dst.wait() == 1
        src.kill()
        await src.wait()
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [f"migrate-dst: error: the VMM (pid {vmm.pid}) hung up: it exited before its memory was "
                      "whole"], err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag", [["--verify"], ["--run-after", "1"], ["--memory", "anon"]])
def test_what_the_vmm_does_cannot_be_asked_of_the_handler(tmp_path: Path, flag: list[str]) -> None:
    proc = subprocess.run([str(BIN / "migrate-dst"), "--handoff", str(tmp_path / "s"), *flag], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and proc.stderr.splitlines()[0] == (
        f"migrate-dst: error: {flag[0]} cannot go with --handoff: the VMM maps the guest, runs it and proves it")
