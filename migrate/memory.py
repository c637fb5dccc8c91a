"""The guest's memory kinds (``--memory``): what each maps, its page, what the kernel must offer for it.

- ``anon``: private anonymous memory, 4 KiB pages (the default);
- ``memfd``: a memfd mapped shared, as a VMM shares guest memory with device back-ends; 4 KiB pages;
- ``hugetlb``: a hugetlb memfd mapped shared, 2 MiB pages, from the pool reserved in
  ``/proc/sys/vm/nr_hugepages``.

The memory's page is the wire page (``GuestInfo.page_size``): a hugetlb fault asks for, and
``UFFDIO_COPY`` places, a whole 2 MiB page.  The workload's unit stays 4 KiB on every kind, so the
same seed gives the same bytes everywhere and a replay on anonymous memory proves any kind.  The
mapping itself is one C function (``region_map``); hugetlb is mapped without ``MAP_NORESERVE``, so a
pool too small fails there, and never as an ``-EEXIST`` from ``UFFDIO_COPY`` into an empty pool,
which the placers would take for a page already there.
"""

from __future__ import annotations

import enum
import errno
from pathlib import Path

from ._native import ffi, lib
from .errors import UsageError

HUGE_PAGE_SIZE: int = 1 << lib.WIRE_HUGE_SHIFT
MEMINFO = Path("/proc/meminfo")
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


class Memory(enum.IntEnum):
    """The guest's memory kinds; values are the C ``enum memory_kind`` and travel in ``GuestInfo``."""

    anon = lib.MEMORY_ANON
    memfd = lib.MEMORY_MEMFD
    hugetlb = lib.MEMORY_HUGETLB

    @property
    def page_size(self) -> int:
        """The memory's page: what one fault asks for and one placement places."""
        return HUGE_PAGE_SIZE if self is Memory.hugetlb else lib.WIRE_PAGE_SIZE

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1


# What userfaultfd must offer to register each kind for MISSING faults, and to track its writes.
_MISSING = {Memory.memfd: ("UFFD_FEATURE_MISSING_SHMEM", 1 << 5, "4.11"),
            Memory.hugetlb: ("UFFD_FEATURE_MISSING_HUGETLBFS", 1 << 4, "4.11")}
WP_SHARED = ("UFFD_FEATURE_WP_HUGETLBFS_SHMEM", 1 << 12, "5.19")


def require_missing(memory: Memory, features: int) -> None:
    """Fails, naming the feature, when this kernel's userfaultfd cannot register ``memory`` for faults."""
    if memory in _MISSING:
        name, bit, since = _MISSING[memory]
        if not features & bit:
            raise UsageError(f"this kernel cannot register {memory.name} memory with userfaultfd "
                             f"({name}, Linux >= {since})", hint="use --memory anon")


def require_write_tracking(memory: Memory, features: int, mode: str) -> None:
    """Fails, naming the feature, when this kernel cannot track writes to ``memory`` (hybrid, precopy)."""
    name, bit, since = WP_SHARED
    if memory is not Memory.anon and not features & bit:
        raise UsageError(f"--mode {mode} on {memory.name} needs write tracking of shared memory and huge pages "
                         f"({name}, Linux >= {since}; WP_ASYNC and PAGEMAP_SCAN, Linux >= 6.7)",
                         hint="use --mode postcopy, or --memory anon")


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` as numbers (kB for sizes, counts for the HugePages_ lines)."""
    out = {}
    for line in MEMINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


def huge_pages_available() -> tuple[int, int, int]:
    """(available, HugePages_Free, HugePages_Rsvd): a reservation still counts as free until touched."""
    info = meminfo()
    if info.get("Hugepagesize", 0) * 1024 != HUGE_PAGE_SIZE:
        raise UsageError(f"this machine's default huge page is {info.get('Hugepagesize', 0)} kB; "
                         "--memory hugetlb uses 2 MiB pages only", hint="boot with default_hugepagesz=2M")
    free, rsvd = info["HugePages_Free"], info["HugePages_Rsvd"]
    return free - rsvd, free, rsvd


def shortage(size: int) -> UsageError | None:
    """The one-line error for a hugetlb guest of ``size`` bytes that the pool cannot hold now, else None."""
    need = size // HUGE_PAGE_SIZE
    available, free, rsvd = huge_pages_available()
    if available >= need:
        return None
    total = int(NR_HUGEPAGES.read_text())
    return UsageError(
        f"a {size >> 20} MiB hugetlb guest needs {need} free 2 MiB huge pages; {available} are available "
        f"(HugePages_Free {free} - HugePages_Rsvd {rsvd})",
        hint=f"as root: echo {total + need - available} > {NR_HUGEPAGES}   (now {total}; the other side of a "
             "migration on this machine needs as many again)")


def map_region(size: int, memory: Memory) -> int:
    """Maps ``size`` bytes of ``memory``; its address.

    Raises:
        UsageError: too few huge pages (with the numbers and the command that reserves them), a size
            that is not whole huge pages, or no memory.
    """
    if memory is Memory.hugetlb:
        if size % HUGE_PAGE_SIZE:
            raise UsageError(f"a hugetlb guest is whole 2 MiB pages, not {size >> 20} MiB",
                             hint="use an even --guest-mib")
        if (short := shortage(size)) is not None:
            raise short
    base: int = lib.region_map(size, memory)
    if base:
        return base
    err = ffi.errno  # saved by cffi right after the call
    if memory is Memory.hugetlb and err == errno.ENOMEM and (short := shortage(size)) is not None:
        raise short  # another process took the pages since the check
    raise UsageError(f"cannot map a {memory.name} guest of {size >> 20} MiB: {errno.errorcode.get(err, err)}",
                     hint="use a smaller --guest-mib")
