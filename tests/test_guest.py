"""The deterministic guest: replay is exact, CPU state travels whole."""

from __future__ import annotations

import select
import time

import pytest

from helpers import run_a_while
from migrate.errors import UsageError
from migrate.guest import Guest, GuestSpec, Workload, replay
from migrate.uffd import PAGE_SIZE, Userfaultfd


@pytest.mark.parametrize("workload", list(Workload))
def test_replay_digest_equals_live_run(workload: Workload) -> None:
    spec = GuestSpec(pages=2048, vcpus=3, workload=workload, seed=7)
    g = Guest(spec, fill=True)
    run_a_while(g)
    steps = g.steps()
    assert all(s > 0 for s in steps)
    assert replay(spec, steps) == (g.digest(), g.export_state())
    g.close()


def test_cpu_state_round_trip_continues_the_same_run() -> None:
    """Run, stop, move the state to a second guest with the same memory, finish there == one run."""
    spec = GuestSpec(pages=512, vcpus=2, workload=Workload.uniform, seed=3)
    a = Guest(spec, fill=True)
    a.start(max_steps=[10_000, 20_000])
    a.join()
    b = Guest(spec, fill=True)
    b.start(max_steps=[10_000, 20_000])  # same memory contents as a
    b.join()
    b.import_state(a.export_state())
    assert b.export_state() == a.export_state()
    b.start(max_steps=[15_000, 25_000])
    b.join()
    assert replay(spec, [15_000, 25_000]) == (b.digest(), b.export_state())
    a.close()
    b.close()


def test_different_steps_give_different_digests() -> None:
    spec = GuestSpec(pages=64, vcpus=1, workload=Workload.uniform)
    assert replay(spec, [1000])[0] != replay(spec, [1001])[0]


def test_zero_fraction_leaves_zero_pages() -> None:
    spec = GuestSpec(pages=4096, vcpus=1, zero_permille=500)
    g = Guest(spec, fill=True)
    out, zeros = bytearray(4096 * 4096), bytearray(4096)
    g.read_pages(0, 4096, out, zeros)
    assert 0.35 < sum(zeros) / 4096 < 0.65
    g.close()


@pytest.mark.parametrize("kwargs", [{"pages": 0}, {"pages": 2, "vcpus": 3}, {"pages": 8, "zero_permille": 1001}])
def test_impossible_guests_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        GuestSpec(**kwargs)


# -- stalls: only accesses that waited for a page ---------------------------
def _registered_guest(pages: int) -> tuple[Guest, Userfaultfd]:
    g = Guest(GuestSpec(pages=pages, vcpus=1, workload=Workload.uniform, seed=5), fill=False)
    uffd = Userfaultfd()
    uffd.register(g.base, g.spec.size)
    g.time_stalls(True)
    return g, uffd


def test_copy_on_write_of_zero_pages_is_no_stall() -> None:
    """Pages placed as zero pages fault again when written (copy-on-write), but nothing waits for the migration."""
    g, uffd = _registered_guest(4096)
    uffd.zeropage(g.base, g.spec.size)
    g.start(max_steps=[200_000])  # uniform: 75% writes, every page written many times
    g.join()
    s = g.stalls()
    assert s.count == 0 and s.total_ns == 0 and sum(s.qemu_dist) == 0, s.summary()
    uffd.close()
    g.close()


def test_a_fault_served_late_is_one_stall_in_both_histograms() -> None:
    """Each missing page is served 1 ms after its fault: one stall per fault, in QEMU's 1 ms buckets too."""
    g, uffd = _registered_guest(64)
    g.start(max_steps=[20_000])  # touches every one of the 64 pages
    page, faults = bytes(range(256)) * 16, 0
    deadline = time.monotonic() + 20
    while g.running() and time.monotonic() < deadline:
        select.select([uffd.fd], [], [], 0.01)
        for addr, _tid in uffd.read_faults():
            time.sleep(0.001)  # a slow network
            faults += uffd.copy(addr & ~(PAGE_SIZE - 1), page, PAGE_SIZE).pages
    g.join()
    s = g.stalls()
    assert faults == 64
    assert s.count == faults, s.summary()
    # QEMU's bucket N holds [2^N, 2^(N+1)) µs: every wait is >= 1000 µs, so bucket 9 or above.
    assert sum(s.qemu_dist) == s.count and sum(s.qemu_dist[9:]) == s.count
    assert s.percentile_us(0.5) >= 1000
    summary = s.summary()
    assert len(summary.qemu_dist) == 24 and summary.slow_other >= 0
    assert sum(n for _, n in summary.hist) == s.count
    uffd.close()
    g.close()


def test_a_vcpu_that_outlives_its_guest_object_writes_only_its_own_memory() -> None:
    """A vCPU asleep in a fault is never joined: a failing destination asks it to stop and exits, and
    the interpreter then frees every object on its way out while that thread may still run (a gated
    vCPU woken by the stop does run).  So its CPU state, stall counters and stop flag must not be
    memory the garbage collector frees: here the Guest object goes away while its vCPU sleeps in a
    fault, buffers of the same types take the freed memory's place, and the fault is then resolved.
    The vCPU writes its state on its way out; before, that went into those buffers (glibc reuses a
    freed chunk of the same size first; ASan: heap-use-after-free in vcpu_run)."""
    import gc
    from migrate._native import ffi, lib

    spec = GuestSpec(pages=16, vcpus=1, workload=Workload.sequential)
    uffd = Userfaultfd()
    guest = Guest(spec, fill=False)
    base, thread = guest.base, None
    try:
        uffd.register(base, spec.size)
        guest.start()
        thread = guest._threads[0]
        deadline = time.monotonic() + 10
        while not select.select([uffd.fd], [], [], 0.05)[0]:  # the vCPU sleeps in its first fault
            assert time.monotonic() < deadline, "the vCPU never faulted"
        guest.request_stop()
        del guest
        gc.collect()
        pattern = b"\xa5" * ffi.sizeof("stall_stats_t")
        decoys = [(ffi.new("vcpu_state_t[]", 1), ffi.new("stall_stats_t[]", 1), ffi.new("int[]", 1), ffi.new("int[]", 1))
                  for _ in range(64)]
        for decoy in decoys:
            for buf in decoy:
                ffi.memmove(buf, pattern, ffi.sizeof(buf))
        uffd.zeropage(base, spec.size)  # wakes the vCPU: it sees its stop and returns
        thread.join(10)
        assert not thread.is_alive()
        for decoy in decoys:
            for buf in decoy:
                assert bytes(ffi.buffer(buf)) == pattern[:ffi.sizeof(buf)], "a vCPU wrote into freed memory"
    finally:
        if thread is not None:
            thread.join(10)
        uffd.close()
        if thread is None or not thread.is_alive():
            lib.region_unmap(base, spec.size)
