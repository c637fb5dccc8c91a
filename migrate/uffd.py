"""Python face of the native userfaultfd layer: validates, calls C, raises UffdError.

The calls here never touch guest memory themselves: the kernel places pages,
so they are safe from the trio thread.  cffi releases the GIL around each call.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ._native import ffi, lib
from .errors import UffdError

# One definition of each, in native/wire.h: a fault batch is what one page request carries.
PAGE_SIZE: int = lib.WIRE_PAGE_SIZE
_MAX_FAULTS: int = lib.WIRE_MAX_REQUEST_RUNS


def _open_hint(syscall_errno: int, device_errno: int) -> str:
    if syscall_errno == errno.ENOSYS:
        return "this kernel has no userfaultfd (CONFIG_USERFAULTFD=n); use a Linux >= 5.11 built with it"
    if device_errno in (errno.EACCES, errno.EPERM):
        return ("the userfaultfd syscall is blocked (seccomp in a container?) and /dev/userfaultfd is not "
                "accessible: allow the syscall in the seccomp profile, or grant the device "
                "(docker: --device /dev/userfaultfd; host: chmod/chgrp /dev/userfaultfd)")
    if device_errno == errno.ENOENT:
        return ("the userfaultfd syscall is blocked (seccomp in a container?) and /dev/userfaultfd does not "
                "exist: allow the syscall (e.g. docker --security-opt seccomp=docker/seccomp-uffd.json) "
                "or run as root with sysctl vm.unprivileged_userfaultfd=1")
    return "check seccomp, sysctl vm.unprivileged_userfaultfd and /dev/userfaultfd permissions"


@dataclass(frozen=True)
class Placed:
    """Result of one placement: bytes newly placed, and pages the kernel already had."""

    bytes: int
    existed: int

    @property
    def pages(self) -> int:
        return self.bytes // PAGE_SIZE


class Userfaultfd:
    """A non-blocking userfaultfd with the API handshake done (unless ``api=False``).

    Args:
        api: do the UFFDIO_API handshake (once per descriptor: without it the caller does its own).
        want: the features the handshake asks for (default: thread ids in fault messages).

    Raises:
        UffdError: when userfaultfd cannot be opened, with a hint saying why.
    """

    def __init__(self, *, api: bool = True, want: int | None = None) -> None:
        se, de = ffi.new("int *"), ffi.new("int *")
        fd = lib.uffd_open(se, de)
        if fd < 0:
            raise UffdError("opening a userfaultfd", se[0], _open_hint(se[0], de[0]))
        self.fd: int = fd
        self.features: int = 0
        if api:
            features = ffi.new("uint64_t *")
            self._check("UFFDIO_API", lib.uffd_api(fd, features) if want is None
                        else lib.uffd_api_features(fd, want, features))
            self.features = features[0]

    @classmethod
    def adopt(cls, fd: int) -> Userfaultfd:
        """A userfaultfd another process opened, registered and handed over (its handshake done there)."""
        uffd = cls.__new__(cls)
        uffd.fd, uffd.features = fd, 0
        return uffd

    @staticmethod
    def offered() -> int:
        """The features this kernel's userfaultfd offers (a descriptor opened for the question, then closed)."""
        uffd = Userfaultfd()
        uffd.close()
        return uffd.features

    def _check(self, operation: str, rc: int) -> None:
        if rc < 0:
            raise UffdError(operation, -rc)

    def register(self, addr: int, length: int) -> None:
        """Registers a page-aligned range in MISSING mode."""
        _check_aligned(addr, length)
        self._check("UFFDIO_REGISTER", lib.uffd_register(self.fd, addr, length))

    def copy(self, dst: int, src: object, length: int, page: int = PAGE_SIZE) -> Placed:
        """Places ``length`` bytes of ``src`` (a buffer) at ``dst`` in pages of ``page`` bytes (the memory's);
        present pages are skipped."""
        _check_aligned(dst, length, page)
        out = ffi.new("uint64_t[2]")  # per call: placements may run in several threads
        self._check("UFFDIO_COPY", lib.uffd_copy(self.fd, dst, ffi.from_buffer(src), length, page, out, out + 1, -1))
        return Placed(out[0], out[1] // page)

    def zeropage(self, dst: int, length: int, page: int = PAGE_SIZE) -> Placed:
        """Places zero pages over ``[dst, dst+length)`` (on hugetlb: copies of a zero page); present pages are
        skipped."""
        _check_aligned(dst, length, page)
        out = ffi.new("uint64_t[2]")
        self._check("UFFDIO_ZEROPAGE", lib.uffd_zeropage(self.fd, dst, length, page, out, out + 1, -1))
        return Placed(out[0], out[1] // page)

    def read_faults(self) -> list[tuple[int, int]]:
        """Pending page faults as (address, thread id), without blocking; [] when none."""
        addrs, tids = ffi.new("uint64_t[]", _MAX_FAULTS), ffi.new("uint32_t[]", _MAX_FAULTS)
        n = lib.uffd_read_faults(self.fd, addrs, tids, _MAX_FAULTS)
        self._check("reading userfaultfd", n)
        return [(addrs[i], tids[i]) for i in range(n)]

    def close(self) -> None:
        """Closes the fd.  Only once every page is placed: an unregistered missing page reads as zeros."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_aligned(addr: int, length: int, page: int = PAGE_SIZE) -> None:
    if addr % page or length % page or length <= 0:
        raise ValueError(f"range {addr:#x}+{length:#x} is not a positive run of whole pages")
