"""The native userfaultfd layer against the real kernel."""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time

import pytest

from migrate._native import ffi, lib
from migrate.uffd import PAGE_SIZE, Userfaultfd


@pytest.fixture
def region():
    """A registered 16-page region, unmapped afterwards."""
    uffd = Userfaultfd()
    n = 16
    base = lib.region_map(n * PAGE_SIZE, 0)
    uffd.register(base, n * PAGE_SIZE)
    yield uffd, base, n
    lib.region_unmap(base, n * PAGE_SIZE)
    uffd.close()


def peek(base: int, page: int) -> bytes:
    """Reads a page that is present (a missing one would block this thread forever)."""
    return bytes(ffi.buffer(ffi.cast("char *", base + page * PAGE_SIZE), PAGE_SIZE))


def test_api_reports_features() -> None:
    uffd = Userfaultfd()
    assert uffd.features & (1 << 8), "UFFD_FEATURE_THREAD_ID offered"
    uffd.close()


def test_copy_skips_pages_already_present(region) -> None:
    uffd, base, n = region
    data = bytes(range(256)) * (n * PAGE_SIZE // 256)
    assert uffd.copy(base + 5 * PAGE_SIZE, data[:PAGE_SIZE], PAGE_SIZE).pages == 1
    assert uffd.copy(base + 9 * PAGE_SIZE, data[:2 * PAGE_SIZE], 2 * PAGE_SIZE).pages == 2
    # The kernel stops at page 5 (-EAGAIN with the bytes placed), refuses it
    # (-EEXIST), and so on: all absent pages still get placed, once.
    placed = uffd.copy(base, data, n * PAGE_SIZE)
    assert (placed.pages, placed.existed) == (n - 3, 3)
    assert peek(base, 0) == data[:PAGE_SIZE]
    assert peek(base, 15) == data[15 * PAGE_SIZE:]
    again = uffd.copy(base, data, n * PAGE_SIZE)
    assert (again.pages, again.existed) == (0, n)


def test_zeropage_and_mixed(region) -> None:
    uffd, base, n = region
    assert uffd.copy(base + 2 * PAGE_SIZE, b"\x01" * PAGE_SIZE, PAGE_SIZE).pages == 1
    placed = uffd.zeropage(base, n * PAGE_SIZE)
    assert (placed.pages, placed.existed) == (n - 1, 1)
    assert peek(base, 0) == bytes(PAGE_SIZE)
    assert peek(base, 2) == b"\x01" * PAGE_SIZE


def test_misaligned_range_is_refused(region) -> None:
    uffd, base, _ = region
    with pytest.raises(ValueError):
        uffd.copy(base + 1, b"x" * PAGE_SIZE, PAGE_SIZE)


def test_batch_read_returns_every_faulting_thread(region) -> None:
    uffd, base, n = region
    assert uffd.read_faults() == []
    threads = [threading.Thread(target=lib.guest_digest, args=(base + i * PAGE_SIZE, 1)) for i in (3, 7, 11)]
    for t in threads:
        t.start()
    faults: list[tuple[int, int]] = []
    deadline = time.monotonic() + 10
    while len(faults) < 3 and time.monotonic() < deadline:
        select.select([uffd.fd], [], [], 1)
        faults += uffd.read_faults()
    assert sorted((a - base) // PAGE_SIZE for a, _ in faults) == [3, 7, 11]
    assert all(tid > 0 for _, tid in faults)
    uffd.zeropage(base, n * PAGE_SIZE)  # wakes them: no UFFDIO_WAKE needed
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()


def test_forbidden_userfaultfd_gives_one_line_with_hint(no_uffd) -> None:
    proc = subprocess.run([str(no_uffd), sys.executable, "-m", "migrate.check"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "userfaultfd is not available" in proc.stderr
    assert "hint:" in proc.stderr and "seccomp" in proc.stderr
