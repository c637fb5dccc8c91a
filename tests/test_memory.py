"""The guest's memory kinds end to end: memfd (shared memory, 4 KiB) and hugetlb (2 MiB pages), in every mode.

Real migrate-src and migrate-dst processes on 127.0.0.1, each run proven by
replay (--verify; the replay runs on anonymous memory: the workload's bytes do
not depend on the kind).  Huge pages come from the pool: the ``huge_pages``
fixture raises ``/proc/sys/vm/nr_hugepages`` by what a test needs (root) and
gives them back; without root those tests skip with the command that would
enable them.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import trio

from helpers import BIN, DST, REPORT, Pki, migrate, run_destination, start_source
from migrate._native import ffi, lib
from migrate.errors import UffdError, UsageError
from migrate.memory import (HUGE_PAGE_SIZE, NR_HUGEPAGES, Memory, huge_pages_available, map_region, require_missing,
                            require_write_tracking)
from migrate.uffd import Userfaultfd
from test_modes import WORKLOADS, check_mode, migrate_through_cuts

GUEST_MIB = 32
# Both sides of one migration hold a whole guest of huge pages (no MAP_NORESERVE).
NEEDED = 2 * GUEST_MIB * 2**20 // HUGE_PAGE_SIZE


@pytest.fixture
def huge_pages() -> Iterator[None]:
    """Reserves the huge pages two 32 MiB hugetlb guests need, and gives them back."""
    available, _, _ = huge_pages_available()
    if available >= NEEDED:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip(f"hugetlb tests need {NEEDED} free 2 MiB huge pages; as root: "
                    f"echo {int(NR_HUGEPAGES.read_text()) + NEEDED - available} > {NR_HUGEPAGES}")
    before = NR_HUGEPAGES.read_text()
    NR_HUGEPAGES.write_text(str(int(before) + NEEDED - available))
    try:
        if huge_pages_available()[0] < NEEDED:
            pytest.skip("the kernel could not reserve enough huge pages (memory fragmented)")
        yield
    finally:
        NR_HUGEPAGES.write_text(before)


def args(memory: str, mode: str, workload: str) -> list[str]:
    return ["--guest-mib", str(GUEST_MIB), "--memory", memory, "--mode", mode, "--workload", workload,
            "--run-before", "0.3"]


def report(memory: str, mode: str, m) -> None:  # noqa: ANN001 - DestinationStats
    REPORT.append(f"{memory} {mode} {m.workload}: {m.pages_total} pages of {m.page_size >> 10} KiB, "
                  f"{m.faults} faults, stall p50 {m.vcpu_stall_us.p50:.0f} µs p99 {m.vcpu_stall_us.p99:.0f} µs, "
                  f"downtime {m.downtime_ms:.2f} ms, {m.total_s:.2f} s, verified")


@pytest.mark.parametrize("workload", WORKLOADS)
async def test_postcopy_on_memfd_verifies(tmp_path: Path, workload: str) -> None:
    m, s = check_mode(await migrate(tmp_path, args("memfd", "postcopy", workload), DST, timeout=60), "postcopy")
    assert m.memory == s.memory == "memfd" and m.page_size == 4096 and m.pages_total == GUEST_MIB * 256
    report("memfd", "postcopy", m)


@pytest.mark.parametrize("workload", WORKLOADS)
async def test_postcopy_on_hugetlb_verifies(tmp_path: Path, workload: str, huge_pages: None) -> None:
    """Faults ask for, and the wire carries, whole 2 MiB pages; zero huge pages are copied from a zero page."""
    m, s = check_mode(await migrate(tmp_path, args("hugetlb", "postcopy", workload), DST, timeout=60), "postcopy")
    assert m.memory == s.memory == "hugetlb" and m.page_size == HUGE_PAGE_SIZE
    assert m.pages_total == GUEST_MIB // 2 == m.pages_placed
    report("hugetlb", "postcopy", m)


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("mode", ["hybrid", "precopy"])
async def test_rounds_on_memfd_verify(tmp_path: Path, mode: str, workload: str) -> None:
    """Write tracking on shared memory, and discards by MADV_REMOVE (MADV_DONTNEED would leave the old page)."""
    m, s = check_mode(await migrate(tmp_path, args("memfd", mode, workload), DST, timeout=60), mode)
    report("memfd", mode, m)


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("mode", ["hybrid", "precopy"])
async def test_rounds_on_hugetlb_verify(tmp_path: Path, mode: str, workload: str, huge_pages: None) -> None:
    """Write tracking of huge pages, in 2 MiB granules; discards by MADV_REMOVE."""
    m, s = check_mode(await migrate(tmp_path, args("hugetlb", mode, workload), DST, timeout=60), mode)
    assert all(r.pages <= GUEST_MIB // 2 for r in s.rounds)
    report("hugetlb", mode, m)


@pytest.mark.parametrize("memory", ["memfd", "hugetlb"])
async def test_tls_migration_on_shared_memory_and_huge_pages_verifies(tmp_path: Path, memory: str,
                                                                       request: pytest.FixtureRequest) -> None:
    """Mutual TLS on every connection: a 2 MiB page is one wire page but 128 TLS records, on the stream
    and in each reply; the faulted pages come back whole over TLS and the guest verifies."""
    if memory == "hugetlb":
        request.getfixturevalue("huge_pages")
    pki = Pki(tmp_path / "pki")
    run = await migrate(tmp_path, [*args(memory, "postcopy", "uniform"), "--zero-fraction", "0", *pki.args("src")],
                        [*DST, *pki.args("dst")], timeout=60)
    m, s = check_mode(run, "postcopy")
    assert m.memory == s.memory == memory and m.page_size == Memory[memory].page_size
    assert m.tls.startswith("TLSv1.3") and s.tls.startswith("TLSv1.3")
    assert m.pages_placed_urgent > 0 and m.bytes_urgent >= m.pages_placed_urgent * m.page_size  # replies, over TLS
    report(memory, "postcopy over TLS", m)


async def test_a_memfd_guest_into_anonymous_memory_verifies(tmp_path: Path) -> None:
    """Both have 4 KiB pages: the destination may map the guest as another 4 KiB kind."""
    run = await migrate(tmp_path, args("memfd", "hybrid", "uniform"), [*DST, "--memory", "anon"], timeout=60)
    m, s = check_mode(run, "hybrid")
    assert (s.memory, m.memory) == ("memfd", "anon")


async def test_a_hugetlb_guest_cannot_become_4k_pages(tmp_path: Path, huge_pages: None) -> None:
    src, port = await start_source(tmp_path, args("hugetlb", "postcopy", "uniform"))
    with trio.fail_after(60):
        rc, err, _ = await run_destination(tmp_path, port, [*DST, "--memory", "memfd"])
    src.kill()
    await src.wait()
    assert rc == 1 and "Traceback" not in err
    assert [x for x in err.splitlines() if "error:" in x] == [
        "migrate-dst: error: --memory memfd cannot take the source's hugetlb guest (2048 KiB pages): a wire page "
        "must be the memory's page"], err


async def test_prefetch_is_refused_for_a_hugetlb_guest(tmp_path: Path, huge_pages: None) -> None:
    """--prefetch asks for 4 KiB neighbours: on 2 MiB pages it would mean 512 pages each, so it is refused
    in one line, before anything is mapped."""
    src, port = await start_source(tmp_path, args("hugetlb", "postcopy", "uniform"))
    with trio.fail_after(60):
        rc, err, _ = await run_destination(tmp_path, port, [*DST, "--prefetch", "4"])
    src.kill()
    await src.wait()
    assert "Traceback" not in err
    assert [x for x in err.splitlines() if "error:" in x] == [
        "migrate-dst: error: --prefetch asks for 4 KiB neighbours; a hugetlb guest's page is already 2 MiB"], err
    assert rc == 1 and "hint: leave --prefetch out for a hugetlb guest" in err


def test_too_few_huge_pages_is_one_line_with_the_numbers_and_the_command() -> None:
    available, free, rsvd = huge_pages_available()
    mib = 2 * (available + 1)  # one huge page more than the pool holds now
    proc = subprocess.run([str(BIN / "migrate-src"), "--listen", "127.0.0.1:0", "--guest-mib", str(mib),
                           "--memory", "hugetlb"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"migrate-src: error: a {mib} MiB hugetlb guest needs {available + 1} free 2 MiB huge pages; "
        f"{available} are available (HugePages_Free {free} - HugePages_Rsvd {rsvd})",
        f"migrate-src: hint: as root: echo {int(NR_HUGEPAGES.read_text()) + 1} > /proc/sys/vm/nr_hugepages   (now "
        f"{int(NR_HUGEPAGES.read_text())}; the other side of a migration on this machine needs as many again)"], \
        proc.stderr
    REPORT.append(f"hugetlb shortage: {proc.stderr.splitlines()[0]}")


@pytest.mark.parametrize("memory", [Memory.memfd, Memory.hugetlb])
def test_a_discard_on_a_memfd_needs_madv_remove(memory: Memory, huge_pages: None) -> None:
    """MADV_DONTNEED only unmaps a memfd's page: the next copy meets -EEXIST and the old bytes stay (on
    hugetlb uffd_copy sees the page unmapped and says so).  MADV_REMOVE (region_discard's choice for a
    memfd) makes the page missing again."""
    page = memory.page_size
    base = map_region(page, memory)
    uffd = Userfaultfd()
    try:
        uffd.register(base, page)
        assert uffd.copy(base, b"\x01" * page, page, page).existed == 0
        assert lib.region_discard(base, page, Memory.anon) == 0  # MADV_DONTNEED: what anon memory takes
        if memory is Memory.hugetlb:
            with pytest.raises(UffdError) as caught:  # -EEXIST, and pagemap: not mapped
                uffd.copy(base, b"\x02" * page, page, page)
            assert caught.value.errno == errno.ENOSPC
        else:
            assert uffd.copy(base, b"\x02" * page, page, page).existed == 1  # the old page is still there
        assert lib.region_discard(base, page, memory) == 0  # MADV_REMOVE
        assert uffd.copy(base, b"\x03" * page, page, page).existed == 0
    finally:
        uffd.close()
        lib.region_unmap(base, page)


def test_a_zero_huge_page_is_copied_from_a_zero_page(huge_pages: None) -> None:
    """hugetlb refuses UFFDIO_ZEROPAGE (-EINVAL); uffd_zeropage copies a static zero page there instead."""
    page = HUGE_PAGE_SIZE
    base = map_region(2 * page, Memory.hugetlb)
    uffd = Userfaultfd()
    try:
        uffd.register(base, 2 * page)
        with pytest.raises(UffdError, match="UFFDIO_ZEROPAGE") as caught:
            uffd.zeropage(base, page)  # as 4 KiB pages: the ioctl itself
        assert caught.value.errno == errno.EINVAL
        t0 = time.perf_counter()
        placed = uffd.zeropage(base, 2 * page, page)
        REPORT.append(f"hugetlb: two zero 2 MiB pages placed by UFFDIO_COPY in {(time.perf_counter() - t0) * 1e6:.0f} µs")
        assert (placed.bytes, placed.existed) == (2 * page, 0)
        assert uffd.zeropage(base, 2 * page, page).existed == 2  # already there: -EEXIST per huge page
    finally:
        uffd.close()
        lib.region_unmap(base, 2 * page)


def test_a_kernel_without_a_kind_s_feature_is_refused_naming_it() -> None:
    """What an older kernel's UFFDIO_API leaves out (features 0 here) is named, with the Linux that has it."""
    require_missing(Memory.anon, 0)  # anonymous memory needs nothing beyond userfaultfd
    with pytest.raises(UsageError, match=r"^this kernel cannot register hugetlb memory with userfaultfd "
                                         r"\(UFFD_FEATURE_MISSING_HUGETLBFS, Linux >= 4.11\)$"):
        require_missing(Memory.hugetlb, 0)
    with pytest.raises(UsageError, match=r"\(UFFD_FEATURE_MISSING_SHMEM, Linux >= 4.11\)$"):
        require_missing(Memory.memfd, 0)
    with pytest.raises(UsageError, match=r"^--mode hybrid on memfd needs write tracking of shared memory and huge "
                                         r"pages \(UFFD_FEATURE_WP_HUGETLBFS_SHMEM, Linux >= 5.19;"):
        require_write_tracking(Memory.memfd, 0, "hybrid")
    require_write_tracking(Memory.anon, 0, "hybrid")  # anon's own check is the write tracking itself


def test_an_empty_pool_is_never_taken_for_a_page_already_there() -> None:
    """Under MAP_NORESERVE (which region_map never uses) UFFDIO_COPY into a huge page the pool cannot supply
    answers -EEXIST; uffd_copy checks pagemap and says what it is instead of counting a race absorbed."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to empty the huge page pool for a moment")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fd = os.memfd_create("empty-pool", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    before = NR_HUGEPAGES.read_text()
    uffd, base = Userfaultfd(), None
    try:
        os.ftruncate(fd, HUGE_PAGE_SIZE)
        base = libc.mmap(None, HUGE_PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | 0x4000, fd, 0)
        assert base not in (None, ctypes.c_void_p(-1).value)  # 0x4000: MAP_NORESERVE
        uffd.register(base, HUGE_PAGE_SIZE)
        NR_HUGEPAGES.write_text(str(max(0, int(before) - huge_pages_available()[0])))  # no free huge page left
        if huge_pages_available()[0] > 0:
            pytest.skip("the pool did not empty")
        with pytest.raises(UffdError) as caught:
            uffd.copy(base, b"\x01" * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, HUGE_PAGE_SIZE)
        assert caught.value.errno == errno.ENOSPC
    finally:
        NR_HUGEPAGES.write_text(before)
        uffd.close()
        if base not in (None, ctypes.c_void_p(-1).value):
            libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(HUGE_PAGE_SIZE))
        os.close(fd)


async def test_hugetlb_recovers_from_cut_links(tmp_path: Path, huge_pages: None) -> None:
    """Links cut in round 1 and later: the Resume's absent runs, the re-requested pages of the waiting
    vCPUs and the stream are counted in 2 MiB pages, and the guest verifies."""
    m, s, err = await migrate_through_cuts(
        tmp_path, ["--guest-mib", str(GUEST_MIB), "--memory", "hugetlb", "--zero-fraction", "0", "--workload",
                   "uniform", "--mode", "hybrid", "--run-before", "0.3"], [8 << 20, 40 << 20])
    assert m.memory == "hugetlb" and len(m.recoveries) == 2
    REPORT.append(f"hugetlb hybrid recovery: {[r.to_json() for r in m.recoveries]}, verified")


CORPUS = Path(__file__).parent / "fuzz" / "corpus" / "wire"


def wire_check_as_fuzzed(data: bytes) -> tuple[int, int, int]:
    """What tests/fuzz/fuzz_wire.c does with an input: (wire_check's length or -errno, wire_check_runs', shift).

    The input is a struct wire_frame, the guest's pages (8 bytes), the accept mask (its top bit: 2 MiB
    wire pages), then struct wire_run entries."""
    data = data.ljust(41, b"\0")
    frame, why = ffi.new("struct wire_frame *"), ffi.new("const char **")
    ffi.memmove(frame, data[:32], 32)
    pages, mask = int.from_bytes(data[32:40], "little"), data[40]
    shift = lib.WIRE_HUGE_SHIFT if mask & 0x80 else lib.WIRE_PAGE_SHIFT
    n = (len(data) - 41) // 16
    runs = ffi.new("struct wire_run[]", max(n, 1))
    ffi.memmove(runs, data[41:41 + 16 * n], 16 * n)
    return lib.wire_check(frame, pages, shift, mask & 0x7F, why), lib.wire_check_runs(runs, n, pages, shift, why), shift


def test_the_wire_fuzz_corpus_has_seeds_at_2_mib_pages() -> None:
    """The fuzz target checks wire_check at a hugetlb guest's 2 MiB pages too (its mask's top bit); its
    seeds there: a frame of one huge page is the largest payload, a run of two is refused (while the
    same header at 4 KiB is 8 KiB of pages), a zero reply, a request for whole huge pages."""
    import sys
    sys.path.insert(0, str(CORPUS.parent.parent))
    import seeds
    from migrate import protocol as p

    made = seeds.huge_wire_seeds(seeds.masks())
    assert {f"seed-{name}": data for name, data in made.items()} == {
        f.name: f.read_bytes() for f in CORPUS.glob("seed-huge-*")}  # the corpus is what seeds.py makes
    page, runs, shift = wire_check_as_fuzzed(made["huge-page"])
    assert (page, runs, shift) == (HUGE_PAGE_SIZE, 0, lib.WIRE_HUGE_SHIFT) and page == lib.WIRE_MAX_PAYLOAD
    two = made["huge-two-pages"]
    assert wire_check_as_fuzzed(two)[0] == -errno.EBADMSG
    assert wire_check_as_fuzzed(two[:40] + bytes([two[40] & 0x7F]))[0] == 2 * p.PAGE_SIZE  # at 4 KiB: two pages
    assert wire_check_as_fuzzed(made["huge-reply"])[:2] == (0, 0)
    request, runs, _ = wire_check_as_fuzzed(made["huge-request"])
    assert (request, runs) == (3 * 16, 0)  # three runs of one huge page each, all in the 16-page guest
