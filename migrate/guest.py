"""The demo guest: a memory region plus native vCPU threads running a workload.

A vCPU's whole CPU state is three integers (PRNG state, step count, read
hash); with the seed and the per-vCPU step counts, ``replay`` rebuilds the
exact memory a migrated guest must have, which is how migrations are proven.

Guest memory is touched only by C functions (cffi releases the GIL), called
from vCPU threads or from worker threads: on the destination, any access may
sleep in the kernel until the page is placed.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import threading
import time
from dataclasses import dataclass

from ._native import ffi, lib
from . import pagemap
from . import protocol as p
from .errors import UsageError
from .memory import Memory, map_region
from .metrics import StallHistogram
from .uffd import PAGE_SIZE


class Workload(enum.IntEnum):
    """Access patterns; values are the C ``enum workload``."""

    uniform = lib.WL_UNIFORM
    hotset = lib.WL_HOTSET
    sequential = lib.WL_SEQUENTIAL
    readmostly = lib.WL_READMOSTLY


@dataclass(frozen=True)
class GuestSpec:
    """Everything needed to build a guest, on either side (it travels in the handshake)."""

    pages: int
    vcpus: int = 2
    workload: Workload = Workload.hotset
    seed: int = 1
    zero_permille: int = 250
    rate: int = 0  # accesses per second per vCPU; 0 means as fast as it goes
    memory: Memory = Memory.anon

    def __post_init__(self) -> None:
        if self.pages < 1:
            raise UsageError("the guest needs at least one page")
        if self.size % self.memory.page_size:
            raise UsageError(f"a {self.memory.name} guest is whole {self.memory.page_size >> 10} KiB pages",
                             hint="use an even --guest-mib")
        if not 1 <= self.vcpus <= min(self.pages, 256):
            raise UsageError(f"{self.vcpus} vCPUs do not fit a guest of {self.pages} pages",
                             hint="use at least one page per vCPU and at most 256 vCPUs")
        if not 0 <= self.seed < 1 << 64:
            raise UsageError("the seed must be within 0..2**64-1")
        if not 0 <= self.zero_permille <= 1000:
            raise UsageError("the zero fraction must be within 0..1")
        if self.rate < 0:
            raise UsageError("the access rate cannot be negative")

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE

    @property
    def wire_pages(self) -> int:
        """Pages of the memory's own size (2 MiB on hugetlb): what the wire, the faults and the counters count;
        ``pages`` counts the workload's 4 KiB pages."""
        return self.size // self.memory.page_size

    def info(self, mode: p.Mode) -> p.GuestInfo:
        """The GuestInfo that describes this guest to a destination."""
        return p.GuestInfo(self.wire_pages, self.vcpus, int(self.workload), self.seed, self.zero_permille, self.rate,
                           mode, self.memory.page_size, int(self.memory))

    @classmethod
    def from_info(cls, info: p.GuestInfo, memory: Memory | None = None) -> GuestSpec:
        """The guest a GuestInfo describes, in ``memory`` (default: the source's kind)."""
        return cls(pages=info.pages * info.page_size // PAGE_SIZE, vcpus=info.vcpus, workload=Workload(info.workload),
                   seed=info.seed, zero_permille=info.zero_permille, rate=info.rate,
                   memory=Memory(info.memory) if memory is None else memory)

    def vcpu_slice(self, index: int) -> tuple[int, int]:
        """(first page, page count) of vCPU ``index``: slices are disjoint, so order never matters."""
        first = index * self.pages // self.vcpus
        return first, (index + 1) * self.pages // self.vcpus - first


class Guest:
    """Guest memory and its vCPUs.

    Args:
        spec: what guest to build.
        fill: write the initial contents (the source); the destination leaves
            the region untouched so that every page faults until placed.
    """

    def __init__(self, spec: GuestSpec, *, fill: bool) -> None:
        self.spec = spec
        self.base: int = map_region(spec.size, spec.memory)
        # What the vCPU threads read and write besides guest memory, in a mapping of its own that
        # only close() releases (after every vCPU was joined), never the garbage collector: a vCPU
        # asleep in a fault is never joined, and when a failing process exits the interpreter frees
        # its objects while such a thread may still run (one woken from the gate by the stop does).
        n = spec.vcpus
        sizes = [n * ffi.sizeof("vcpu_state_t"), n * ffi.sizeof("stall_stats_t"), ffi.sizeof("int"),
                 ffi.sizeof("int")]
        offsets = [sum(-(-size // 64) * 64 for size in sizes[:i]) for i in range(len(sizes))]
        self._control_size = offsets[-1] + sizes[-1]
        self._control: int = lib.region_map(self._control_size, Memory.anon)  # zeroed, page-aligned
        if not self._control:
            lib.region_unmap(self.base, spec.size)
            raise UsageError("cannot map the vCPUs' state", hint="the machine is out of memory")
        at = [ffi.cast("char *", self._control + off) for off in offsets]
        self._states = ffi.cast(f"vcpu_state_t(*)[{n}]", at[0])[0]
        self._stalls = ffi.cast(f"stall_stats_t(*)[{n}]", at[1])[0]
        self._stop = ffi.cast("int *", at[2])
        self._gate = ffi.cast("int *", at[3])
        self._threads: list[threading.Thread] = []
        for i in range(spec.vcpus):
            lib.vcpu_init(self._states + i, spec.seed, i)
        if fill:
            lib.guest_fill(self.base, 0, spec.pages, spec.seed, spec.zero_permille)

    def start(self, max_steps: list[int] | None = None, *, gated: bool = False) -> None:
        """Starts one native thread per vCPU; each runs until ``stop`` or its step budget.

        With ``gated``, the threads wait for ``release`` before their first
        step, so that resuming a migrated guest costs one wake-up.
        """
        if self._threads:
            raise RuntimeError("vCPUs already running")
        self._stop[0] = 0
        self._gate[0] = 0
        s = self.spec
        for i in range(s.vcpus):
            first, count = s.vcpu_slice(i)
            budget = max_steps[i] if max_steps is not None else 2**64 - 1
            t = threading.Thread(target=lib.vcpu_run, name=f"vcpu{i}", daemon=True,
                                 args=(self.base, first, count, int(s.workload), self._states + i,
                                       budget, s.rate, self._stop, self._stalls + i,
                                       self._gate if gated else ffi.NULL))
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stops the vCPUs and waits for them.

        Blocks while a vCPU sleeps in a fault, so call it from a worker thread
        on the destination.
        """
        self.request_stop()
        self.join()

    def time_stalls(self, on: bool) -> None:
        """Arms or disarms the vCPUs' timing of accesses (see ``stall_stats_t.armed``)."""
        for i in range(self.spec.vcpus):
            self._stalls[i].armed = int(on)

    def release(self) -> None:
        """Lets vCPUs started with ``gated`` run (their CPU state must be in place)."""
        lib.gate_open(self._gate)

    def request_stop(self) -> None:
        """Asks the vCPUs to stop without waiting: one asleep in a fault stays there."""
        self._stop[0] = 1
        lib.gate_open(self._gate)

    def stopped_at_ns(self) -> int:
        """When the last vCPU stopped (after ``stop``), on CLOCK_MONOTONIC: ``time.monotonic_ns()``'s clock."""
        return max(self._stalls[i].stopped_at_ns for i in range(self.spec.vcpus))

    def join(self) -> None:
        """Waits for every vCPU to finish (its step budget, or a ``stop``)."""
        for t in self._threads:
            t.join()
        self._threads.clear()

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def export_state(self) -> list[tuple[int, int, int]]:
        """CPU state of every vCPU as (prng, steps, acc); only meaningful while stopped."""
        return [(st.prng, st.steps, st.acc) for st in self._states]

    def import_state(self, states: list[tuple[int, int, int]]) -> None:
        """Loads CPU state exported by ``export_state`` (on the other side)."""
        if len(states) != self.spec.vcpus:
            raise ValueError(f"{len(states)} vCPU states for {self.spec.vcpus} vCPUs")
        for st, (prng, steps, acc) in zip(self._states, states):
            st.prng, st.steps, st.acc = prng, steps, acc

    def steps(self) -> list[int]:
        return [st.steps for st in self._states]

    def first_step_ns(self) -> int | None:
        """When the first vCPU completed its first access since ``start``, on CLOCK_MONOTONIC
        (``time.monotonic_ns()``'s clock); None before that.  Only timed accesses count (``time_stalls``)."""
        done = [self._stalls[i].first_step_ns for i in range(self.spec.vcpus) if self._stalls[i].first_step_ns]
        return min(done, default=None)

    def live_steps(self) -> int:
        """Steps all vCPUs have executed so far, while they run (published every 1024 steps)."""
        return sum(self._stalls[i].steps_live for i in range(self.spec.vcpus))

    def live_steps_each(self) -> list[int]:
        """Steps each vCPU has executed so far, while it runs (published every 64-1024 steps)."""
        return [self._stalls[i].steps_live for i in range(self.spec.vcpus)]

    def stalls(self) -> StallHistogram:
        """Accesses that waited for a page, as the vCPUs timed them, all vCPUs merged.

        A snapshot while they run.  Slow accesses that did not wait (see
        ``vcpu_run`` in guest.c) are counted apart, in ``slow_other``.
        """
        s = [self._stalls[i] for i in range(self.spec.vcpus)]
        h = [x.hist for x in s]

        def merged(arrays: list[object]) -> list[int]:
            # Whole arrays at once: the live progress line reads this every redraw.
            return [sum(col) for col in zip(*(memoryview(ffi.buffer(a)).cast("Q") for a in arrays))]

        return StallHistogram(count=sum(x.count for x in h), total_ns=sum(x.total_ns for x in h),
                              max_ns=max(x.max_ns for x in h), buckets=merged([x.buckets for x in h]),
                              qemu_dist=merged([x.qemu_dist for x in s]),
                              slow_other=sum(x.slow_other for x in s),
                              slow_other_ns=sum(x.slow_other_ns for x in s))

    def stuck(self, longer_than_ns: int) -> list[tuple[int, float, int]]:
        """vCPUs inside one access for longer than ``longer_than_ns``: (index, seconds, wire page)."""
        now, out = time.monotonic_ns(), []
        for i in range(self.spec.vcpus):
            s = self._stalls[i]
            since, addr = s.waiting_since_ns, s.waiting_addr
            if since and now - since > longer_than_ns:
                out.append((i, (now - since) / 1e9, (addr - self.base) // self.spec.memory.page_size))
        return out

    def absent_runs(self) -> list[tuple[int, int]]:
        """Wire pages the kernel's page tables do not have yet, as (first page, count) runs (migrate.pagemap)."""
        fd = pagemap.open_pagemap()
        try:
            return pagemap.absent_runs(fd, self.base, self.spec.wire_pages, self.spec.memory.page_shift)
        finally:
            os.close(fd)

    def present_pages(self) -> int:
        """How many wire pages the kernel holds, in one PAGEMAP_SCAN walk (migrate.pagemap)."""
        fd = pagemap.open_pagemap()
        try:
            return pagemap.present_pages(fd, self.base, self.spec.wire_pages, self.spec.memory.page_shift)
        finally:
            os.close(fd)

    def digest(self) -> int:
        """64-bit digest of all guest memory; every page must be present (or it faults)."""
        return lib.guest_digest(self.base, self.spec.pages)

    def read_pages(self, first: int, count: int, out: bytearray, is_zero: bytearray) -> None:
        """Copies pages out of guest memory and flags the all-zero ones (the source's stream)."""
        if first < 0 or count < 0 or first + count > self.spec.pages:
            raise ValueError(f"pages {first}+{count} are outside the guest")
        lib.guest_read_pages(self.base + first * PAGE_SIZE, ffi.from_buffer(out), count,
                             ffi.from_buffer(is_zero))

    def close(self) -> None:
        """Unmaps guest memory and the vCPUs' state; vCPUs must be stopped.

        A guest whose vCPUs cannot be joined (asleep in a fault) is never
        closed: its memory goes with the process.
        """
        if self._threads:
            raise RuntimeError("stop the vCPUs before closing the guest")
        if self.base:
            lib.region_unmap(self.base, self.spec.size)
            self.base = 0
            # The figures stay readable (the CPU state, the stalls): copies, now that no thread runs.
            n = self.spec.vcpus
            states, stalls = ffi.new("vcpu_state_t[]", n), ffi.new("stall_stats_t[]", n)
            ffi.memmove(states, self._states, ffi.sizeof(states))
            ffi.memmove(stalls, self._stalls, ffi.sizeof(stalls))
            self._states, self._stalls, self._stop, self._gate = states, stalls, ffi.new("int *"), ffi.new("int *")
            lib.region_unmap(self._control, self._control_size)


def replay(spec: GuestSpec, steps: list[int],
           removed: tuple[list[int], list[tuple[int, int]]] | None = None) -> tuple[int, list[tuple[int, int, int]]]:
    """Runs the workload on a fresh guest for exactly ``steps[i]`` steps per vCPU, without migration.

    ``removed``: (steps, runs): at those steps, the runs of wire pages were dropped and read as zeros
    from then on (a VMM's ``MADV_DONTNEED``).

    Returns:
        (digest, CPU states): what a correctly migrated guest must show.
    """
    # The rate shapes timing, never results; nor does the memory's kind (no second pool of huge pages).
    guest = Guest(dataclasses.replace(spec, rate=0, memory=Memory.anon), fill=True)
    page = spec.memory.page_size
    try:
        if removed is not None:
            at, runs = removed
            guest.start(max_steps=at)
            guest.join()
            for first, count in runs:
                lib.region_discard(guest.base + first * page, count * page, Memory.anon)
        guest.start(max_steps=steps)
        guest.join()
        return guest.digest(), guest.export_state()
    finally:
        guest.close()
