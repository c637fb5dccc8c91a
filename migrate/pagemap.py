"""What the kernel's page tables hold of a stretch of memory, ours or another process's (``/proc/PID/pagemap``).

Never touches the memory itself: a read of a missing page would sleep in a
fault.  After a lost link the absent pages are exactly what is still missing,
with no record kept in userland; at switchover the present pages are the base
that the placement counters add to (``dst_plane_t`` in native/dataplane.h).
"""

from __future__ import annotations

import errno
import os

from ._native import ffi, lib
from .errors import UffdError

_RUNS = 4096  # runs per C call


def open_pagemap(pid: int | None = None) -> int:
    """An fd of ``/proc/PID/pagemap`` (ours when ``pid`` is None); another process's needs ptrace rights."""
    return os.open(f"/proc/{'self' if pid is None else pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)


def absent_runs(fd: int, base: int, pages: int, shift: int, first: int = 0) -> list[tuple[int, int]]:
    """Pages (of ``1 << shift`` bytes) of the ``pages``-page stretch at ``base`` that are not there, as
    (page, count) runs numbered from ``first``."""
    starts, counts, nxt = ffi.new("uint64_t[]", _RUNS), ffi.new("uint64_t[]", _RUNS), ffi.new("uint64_t *")
    runs: list[tuple[int, int]] = []
    at = 0
    while at < pages:
        n = lib.region_absent_runs(fd, base, at, pages, shift, starts, counts, _RUNS, nxt)
        if n < 0:
            raise UffdError("reading pagemap", -n)
        runs += [(first + starts[i], counts[i]) for i in range(n)]
        at = nxt[0]
    return runs


def present_pages(fd: int, base: int, pages: int, shift: int) -> int:
    """How many pages of the stretch the kernel holds (present or swapped out), in one PAGEMAP_SCAN walk.

    A kernel older than 6.7 has no PAGEMAP_SCAN: the same bits are read from
    pagemap instead (8 bytes a page, a few ms per GiB), so postcopy needs
    nothing newer than userfaultfd itself.
    """
    out = ffi.new("uint64_t *")
    rc = lib.region_present_pages(fd, base, pages << shift, shift, out)
    if rc == -errno.ENOTTY:
        return pages - sum(count for _, count in absent_runs(fd, base, pages, shift))
    if rc < 0:
        raise UffdError("PAGEMAP_SCAN of the present pages", -rc)
    return out[0]
