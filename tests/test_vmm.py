"""migrate-vmm, the VMM stand-in, against a handler written here: it only takes the handoff (checking the
regions and the userfaultfd) and places the snapshot's pages with a plain loop of UFFDIO_COPY.  The
restore must verify by replay, for one region and several, for every Firecracker message; a handler
that hangs up, or places nothing, ends the stand-in in one line."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import trio

from helpers import BIN, REPORT
from test_memory import huge_pages  # noqa: F401 - a fixture
from migrate import pagemap
from migrate._native import ffi, lib
from migrate.handoff import Handoff, Listener
from migrate.memory import Memory
from migrate.snapshot import Snapshot, load
from migrate.stats import RestoreStats


def take_snapshot(directory: Path, *args: str) -> Snapshot:
    subprocess.run([BIN / "migrate-snapshot", directory, "--guest-mib", "16", "--seconds", "0.3", *args],
                   check=True, capture_output=True, timeout=60)
    return load(directory)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Snapshot]:
    root = tmp_path_factory.mktemp("snapshots")
    snaps = {kind: take_snapshot(root / kind, "--memory", kind, "--workload", workload)
             for kind, workload in (("anon", "hotset"), ("memfd", "uniform"))}
    # 2,000 accesses a second per vCPU: however slow the machine, a run of a second touches well under
    # the guest's 4,096 pages.
    snaps["slow"] = take_snapshot(root / "slow", "--workload", "uniform", "--rate", "2000")
    return snaps


def check(got: Handoff, snap: Snapshot, regions: int) -> None:
    """What a handler may rely on: the regions tile the memory file, in the guest's pages."""
    page = snap.spec.memory.page_size
    assert len(got.regions) == regions
    assert sorted((r.offset, r.size) for r in got.regions) == [(r.offset, r.size) for r in got.regions]
    assert got.regions[0].offset == 0 and sum(r.size for r in got.regions) == snap.spec.size
    assert all(r.page_size == page for r in got.regions)
    assert all(a.offset + a.size == b.offset for a, b in zip(got.regions, got.regions[1:]))


def place_all(got: Handoff, image: Path) -> int:
    """Copies every region from the memory image into the VMM through its userfaultfd (a worker thread's
    job: a plain loop, one UFFDIO_COPY run per region).  Returns the bytes placed."""
    placed, existed = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    total = 0
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m, ffi.from_buffer(m) as src, \
            vmm_pagemap(got) as pm:
        for r in got.regions:
            rc = lib.uffd_copy(got.uffd, r.base, src + r.offset, r.size, r.page_size, placed, existed, pm)
            assert rc == 0, rc
            total += placed[0]
    return total


@contextlib.contextmanager
def vmm_pagemap(got: Handoff) -> Iterator[int]:
    """The VMM's /proc/PID/pagemap, which uffd_copy reads to tell a huge page present from a pool run dry."""
    fd = pagemap.open_pagemap(got.pid)
    try:
        yield fd
    finally:
        os.close(fd)


async def serve_faults(got: Handoff, image: Path) -> None:
    """Places each page the VMM faults on, and nothing else, until cancelled: the pages no vCPU touched
    stay missing until the proof's digest faults on them."""
    placed, existed = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    addrs, tids = ffi.new("uint64_t[64]"), ffi.new("uint32_t[64]")
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m, ffi.from_buffer(m) as src, \
            vmm_pagemap(got) as pm:
        while True:
            await trio.lowlevel.wait_readable(got.uffd)
            n = lib.uffd_read_faults(got.uffd, addrs, tids, 64)
            assert n >= 0, n
            for addr in addrs[0:n]:
                r = next(r for r in got.regions if r.base <= addr < r.base + r.size)
                page = addr - addr % r.page_size
                rc = lib.uffd_copy(got.uffd, page, src + r.offset + (page - r.base), r.page_size, r.page_size,
                                   placed, existed, pm)
                assert rc == 0, rc


async def restore(tmp_path: Path, snap: Snapshot, handler, *args: str) -> tuple[int, str, RestoreStats | None]:
    """Runs migrate-vmm against ``handler(handoff)``; returns its exit code, stderr and metrics."""
    sock, metrics = tmp_path / "uffd.sock", tmp_path / "vmm.json"
    listener = Listener(sock)
    result: dict[str, subprocess.CompletedProcess] = {}

    async def vmm() -> None:
        result["vmm"] = await trio.run_process(
            [BIN / "migrate-vmm", "--snapshot", snap.directory, "--handoff", sock, "--seconds", "0.5",
             "--metrics", metrics, *args], capture_stderr=True, check=False)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vmm)
            got = await listener.accept(30)
            try:
                async with trio.open_nursery() as serving:
                    serving.start_soon(handler, got)
                    while "vmm" not in result:  # the VMM never closes the connection while it runs
                        await trio.sleep(0.05)
                    serving.cancel_scope.cancel()
            finally:
                got.close()
    proc = result["vmm"]
    stats = RestoreStats.from_json(json.loads(metrics.read_text())) if metrics.exists() else None
    return proc.returncode, proc.stderr.decode(), stats


@pytest.mark.parametrize(("kind", "regions", "version"), [("anon", 1, "1.12"), ("anon", 2, "1.12"),
                                                          ("anon", 3, "1.6"), ("memfd", 2, "1.7")])
async def test_restore_verifies(tmp_path: Path, snapshots: dict[str, Snapshot], kind: str, regions: int,
                                version: str) -> None:
    snap = snapshots[kind]

    async def handler(got: Handoff) -> None:
        check(got, snap, regions)
        assert await trio.to_thread.run_sync(place_all, got, snap.memory_path) == snap.spec.size

    rc, err, stats = await restore(tmp_path, snap, handler, "--regions", str(regions), "--firecracker", version)
    assert rc == 0, err
    assert err.splitlines()[-1] == "verified: yes"
    assert stats is not None and stats.verified and stats.regions == regions and stats.firecracker == version
    assert stats.memory == kind and stats.pages_total == snap.spec.wire_pages
    assert stats.steps_run > 0 and all(a > b for a, b in zip(stats.vcpu_steps, snap.steps()))
    assert stats.first_step_ms is not None and 0 < stats.first_step_ms < 10_000
    REPORT.append(f"restore {stats.guest_mib:.0f} MiB {kind} in {regions} region(s), Firecracker {version} message, "
                  f"every page placed at once: first vCPU step {stats.first_step_ms:.2f} ms after the handoff, "
                  f"{stats.vcpu_stall_us.count} stalls, verified")


@pytest.mark.parametrize("regions", [1, 2])
async def test_pages_served_on_fault_only(tmp_path: Path, snapshots: dict[str, Snapshot], regions: int) -> None:
    """A handler that places only the pages that fault: the vCPUs stall on each new page, and the proof's
    digest faults in every page no vCPU touched."""
    snap = snapshots["slow"]
    rc, err, stats = await restore(tmp_path, snap, lambda got: serve_faults(got, snap.memory_path),
                                   "--regions", str(regions))
    assert rc == 0, err
    assert stats is not None and stats.verified
    assert 0 < stats.pages_present_after_run < stats.pages_total
    assert stats.vcpu_stall_us.count > 0


@pytest.mark.usefixtures("huge_pages")
@pytest.mark.parametrize("serve", ["whole", "faults"])
async def test_restore_on_huge_pages(tmp_path: Path, serve: str) -> None:
    """A hugetlb guest: regions of 2 MiB pages, page_size 2097152 in the message, each fault served whole."""
    snap = await trio.to_thread.run_sync(take_snapshot, tmp_path / "snap", "--memory", "hugetlb")

    async def handler(got: Handoff) -> None:
        check(got, snap, 2)
        if serve == "whole":
            await trio.to_thread.run_sync(place_all, got, snap.memory_path)
        else:
            await serve_faults(got, snap.memory_path)

    rc, err, stats = await restore(tmp_path, snap, handler, "--regions", "2", "--firecracker", "1.7")
    assert rc == 0, err
    assert stats is not None and stats.verified and stats.page_size == 2 << 20 and stats.pages_total == 8


async def test_a_late_handler(tmp_path: Path, snapshots: dict[str, Snapshot]) -> None:
    """A handler that places pages only after --seconds: the vCPUs wait in their first fault all along, and
    stopping them waits for it too."""
    snap = snapshots["anon"]

    async def handler(got: Handoff) -> None:
        await trio.sleep(0.8)
        await trio.to_thread.run_sync(place_all, got, snap.memory_path)

    rc, err, stats = await restore(tmp_path, snap, handler)
    assert rc == 0, err
    assert stats is not None and stats.verified and stats.first_step_ms is not None and stats.first_step_ms > 500
    stalls = stats.vcpu_stall_us  # each vCPU slept in its first fault until the handler came
    assert 1 <= stalls.count <= snap.spec.vcpus and stalls.max > 500_000


async def test_wrong_memory_does_not_verify(tmp_path: Path, snapshots: dict[str, Snapshot]) -> None:
    """A handler that serves another snapshot's memory (same guest, other steps): the proof says no."""
    snap, other = snapshots["anon"], snapshots["slow"]
    assert snap.spec.size == other.spec.size

    async def handler(got: Handoff) -> None:
        await trio.to_thread.run_sync(place_all, got, other.memory_path)

    rc, err, stats = await restore(tmp_path, snap, handler)
    assert rc == 1 and err.splitlines()[-1] == "verified: NO"
    assert stats is not None and stats.verified is False


async def test_a_handler_that_hangs_up_ends_it_in_one_line(tmp_path: Path, snapshots: dict[str, Snapshot]) -> None:
    snap = snapshots["anon"]

    async def handler(got: Handoff) -> None:
        got.close()  # gone, without placing a page

    rc, err, stats = await restore(tmp_path, snap, handler)
    assert rc == 1 and stats is None
    assert err.splitlines()[-2:] == [
        f"migrate-vmm: error: the page-fault handler hung up with {snap.spec.wire_pages} of {snap.spec.wire_pages} "
        "pages still missing",
        "migrate-vmm: hint: see the handler's own error; the guest cannot go on without them"]


async def test_a_handler_that_places_nothing_times_out(tmp_path: Path, snapshots: dict[str, Snapshot]) -> None:
    snap = snapshots["anon"]

    async def handler(got: Handoff) -> None:
        pass  # holds the connection and the userfaultfd, places nothing

    rc, err, stats = await restore(tmp_path, snap, handler, "--timeout", "0.5")
    assert rc == 1 and stats is None
    last = err.splitlines()[-2:]
    assert last[0].startswith("migrate-vmm: error: vCPU ") and last[0].endswith(": the page-fault handler placed none")
    assert last[1] == "migrate-vmm: hint: is the handler serving the userfaultfd? (--timeout S)"


def test_usage_errors(tmp_path: Path, snapshots: dict[str, Snapshot]) -> None:
    def vmm(*args: object) -> list[str]:
        out = subprocess.run([BIN / "migrate-vmm", "--handoff", tmp_path / "none.sock", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode in (1, 2) and out.stdout == ""
        return out.stderr.splitlines()

    snap = str(snapshots["anon"].directory)
    assert vmm("--snapshot", snap, "--regions", "65")[0] == (
        "migrate-vmm: error: --regions 65: this guest splits into 1 to 64 regions")
    assert vmm("--snapshot", snap, "--firecracker", "1.0")[0] == (
        "migrate-vmm: error: argument --firecracker: Firecracker 1.0 has no userfaultfd handoff (it came in 1.1)")
    assert vmm("--snapshot", tmp_path)[0] == (
        f"migrate-vmm: error: cannot read {tmp_path / 'state.json'}: No such file or directory")
    assert vmm("--snapshot", snap)[0].startswith(
        "migrate-vmm: error: cannot hand the userfaultfd to the page-fault handler at ")
    assert Memory.anon.name in snap
