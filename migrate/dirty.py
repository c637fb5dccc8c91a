"""What the guest wrote, asked of the kernel: the source's dirty tracking for precopy rounds and working-set order.

The guest region is registered with a userfaultfd of its own in
write-protect mode with ``UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED``
and write-protected once; each ``take`` is one ``PAGEMAP_SCAN`` walk that
returns the runs written since the previous one and protects them again.  The
result is the kernel's own record, held here only until it is sent: no
userland dirty bitmap.  The calls never touch guest memory (the kernel walks
its page tables); they take a millisecond or so per GiB, so callers run them
in a worker thread.
"""

from __future__ import annotations

import errno
import os

from ._native import ffi, lib
from .errors import UffdError, UsageError
from .memory import Memory, require_write_tracking
from .uffd import PAGE_SIZE, Userfaultfd

_HINT = ("dirty tracking needs Linux >= 6.7 (UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN); "
         "use --mode postcopy --stream-order address on older kernels")


class Runs:
    """A scan's result: ``n`` runs in a C array (``struct wire_run``) that the native sender reads as is.

    Valid until the tracker's next ``take`` (the arrays alternate, so the
    previous result survives one more scan).
    """

    def __init__(self, array: object, n: int, pages: int) -> None:
        self.array = array
        self.n = n
        self.pages = pages

    def as_list(self) -> list[tuple[int, int]]:
        a = self.array
        return [(a[i].start, a[i].count) for i in range(self.n)]  # type: ignore[index]


class DirtyTracker:
    """Tracks writes to the region at ``base`` of ``pages`` wire pages of ``memory`` from now on (on hugetlb
    the kernel tracks, and the runs count, whole 2 MiB pages).

    Raises:
        UsageError: the kernel cannot track writes asynchronously (older than 6.7).
        UffdError: userfaultfd is unavailable.
    """

    def __init__(self, base: int, pages: int, memory: Memory = Memory.anon) -> None:
        self.base = base
        self.pages = pages
        self.shift = memory.page_shift
        self._uffd = Userfaultfd(api=False)  # the API handshake asks for WP_ASYNC, once per descriptor
        try:
            rc = lib.dirty_track(self._uffd.fd, base, pages << self.shift, memory)
            if rc == -errno.EINVAL:
                raise UsageError("this kernel cannot track writes for precopy rounds or working-set order",
                                 hint=_HINT)
            if rc < 0:
                raise UffdError("registering the guest for write tracking", -rc)
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self._uffd.close()
            raise
        # Two result arrays, used in turn, and one for a union or an intersection; (pages + 1) // 2
        # runs always suffice, so a take never fills its array and takes every written page in one
        # call (dirty_take leaves what does not fit marked written, for a call that would come back).
        cap = (pages + 1) // 2 + 1
        self._arrays = [ffi.new("struct wire_run[]", cap), ffi.new("struct wire_run[]", cap)]
        self._combined = ffi.new("struct wire_run[]", cap)
        self._cap = cap
        self._turn = 0
        self._total = ffi.new("uint64_t *")

    @staticmethod
    def check(memory: Memory = Memory.anon, mode: str = "hybrid") -> None:
        """Fails now, with a hint, if this kernel cannot track writes to ``memory`` (rather than once a guest
        has run): the feature shared memory and huge pages need by name, then a page of anonymous memory
        tracked for real (no huge page is taken from the pool for the question)."""
        require_write_tracking(memory, Userfaultfd.offered(), mode)
        base = lib.region_map(PAGE_SIZE, Memory.anon)
        try:
            tracker = DirtyTracker(base, 1)
            try:
                tracker.take()
            finally:
                tracker.close()
        finally:
            lib.region_unmap(base, PAGE_SIZE)

    def take(self) -> Runs:
        """The runs written since the previous ``take`` (or since tracking began); protects them again."""
        array = self._arrays[self._turn]
        self._turn ^= 1
        n = lib.dirty_take(self._pagemap, self.base, self.pages, self.shift, array, self._cap, self._total)
        if n == -errno.ENOTTY:
            raise UsageError("this kernel has no PAGEMAP_SCAN", hint=_HINT)
        if n < 0:
            raise UffdError("PAGEMAP_SCAN of the written pages", -n)
        return Runs(array, n, self._total[0])

    def union(self, a: Runs, b: Runs) -> Runs:
        """The pages of either scan, as one sorted list of runs (valid until the next union or intersection)."""
        n = lib.runs_union(a.array, a.n, b.array, b.n, self._combined, self._total)
        return Runs(self._combined, n, self._total[0])

    def intersection(self, a: Runs, b: Runs) -> Runs:
        """The pages of both scans (valid until the next union or intersection)."""
        n = lib.runs_intersect(a.array, a.n, b.array, b.n, self._combined, self._total)
        return Runs(self._combined, n, self._total[0])

    def close(self) -> None:
        """Stops tracking (closing the userfaultfd unregisters the region)."""
        if self._uffd.fd >= 0:
            os.close(self._pagemap)
            self._uffd.close()
