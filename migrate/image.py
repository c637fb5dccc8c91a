"""A memory image served as a guest that is already stopped: ``migrate-src --memory-file``.

A snapshot's memory file (raw guest memory, as Firecracker's is) is mapped
read-only, and the source sends from it exactly as it sends from a stopped
guest: no vCPU runs, nothing changes, so postcopy is the only mode, and the
switchover is at once.  Its CPU state is the snapshot's, when a ``state.json``
sits beside the file (``migrate.snapshot``); a bare file has one vCPU at step 0.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import snapshot
from ._native import ffi, lib
from .errors import UsageError
from .guest import GuestSpec
from .memory import Memory
from .snapshot import CpuState


def image_guest(path: str, memory: Memory) -> tuple[GuestSpec, list[CpuState] | None]:
    """The guest a memory file holds, and its CPU state: a snapshot's (``state.json`` beside a file named
    ``memory``, whose kind wins over ``memory``), or for a bare file its size in ``memory``'s pages and none."""
    file = Path(path)
    if file.name == snapshot.MEMORY and (file.parent / snapshot.STATE).exists():
        snap = snapshot.load(file.parent)
        return snap.spec, list(snap.cpu)
    size = _size(path)
    if not size or size % memory.page_size:
        raise UsageError(f"{path} holds {size} bytes: not whole {memory.page_size >> 10} KiB pages of guest memory",
                         hint="pass a snapshot's memory file, or --memory for its page size")
    return GuestSpec(pages=size // 4096, vcpus=1, memory=memory), None


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise UsageError(f"cannot read the memory file {path}: {exc.strerror}") from None


class Image:
    """A memory file, mapped read-only, with the CPU state it was saved with; what ``Migration`` needs of a guest.

    Args:
        path: the memory file.
        spec: the guest it holds (its size must be the file's).
        cpu: each vCPU's (prng, steps, acc); None: one vCPU at its start.
    """

    def __init__(self, path: str, spec: GuestSpec, cpu: list[CpuState] | None = None) -> None:
        if _size(path) != spec.size:
            raise UsageError(f"{path} holds {_size(path)} bytes; its guest has {spec.size}",
                             hint="the memory file and state.json must come from the same snapshot")
        self.spec = spec
        self._cpu = cpu or [(0, 0, 0)] * spec.vcpus
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.base: int = lib.image_map(fd, spec.size)
        finally:
            os.close(fd)
        if not self.base:
            raise UsageError(f"cannot map the memory file {path}: {os.strerror(ffi.errno)}")
        self._stopped_ns = 0

    def start(self) -> None:
        """Nothing runs: an image is a stopped guest."""

    def stop(self) -> None:
        """The switchover's stop, which downtime counts from: the image was stopped all along."""
        self._stopped_ns = time.monotonic_ns()

    def stopped_at_ns(self) -> int:
        return self._stopped_ns

    def steps(self) -> list[int]:
        return [steps for _, steps, _ in self._cpu]

    def live_steps(self) -> int:
        return sum(self.steps())

    def export_state(self) -> list[CpuState]:
        return list(self._cpu)
