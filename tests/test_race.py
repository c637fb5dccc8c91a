"""The race, shown: a background placer and a fault resolver place the same pages
concurrently, with no per-page state anywhere, and nothing is lost.

Everything runs in one process: a source guest runs and stops, a destination
guest registered with userfaultfd resumes its vCPUs at once, a placer thread
copies every page in order while a fault thread copies each faulting page.
The kernel's re-check in userfaultfd_must_wait() is what makes this safe.
"""

from __future__ import annotations

import select
import threading
import time

import pytest
from helpers import REPORT, run_a_while

from migrate._native import ffi
from migrate.guest import Guest, GuestSpec, Workload, replay
from migrate.uffd import PAGE_SIZE, Userfaultfd

WATCHDOG_S = 60


def migrate_in_process(spec: GuestSpec, extra_steps: int, chunk_pages: int) -> dict[str, int]:
    src = Guest(spec, fill=True)
    run_a_while(src)
    dst = Guest(spec, fill=False)
    uffd = Userfaultfd()
    uffd.register(dst.base, spec.size)
    dst.import_state(src.export_state())
    dst.time_stalls(True)
    target = [s + extra_steps for s in src.steps()]
    dst.start(max_steps=target)

    # One tally per thread (a shared "+=" could lose updates between threads).
    placer_tally, fault_tally = {"placed": 0, "eexist": 0}, {"placed": 0, "eexist": 0, "faults": 0}
    done = threading.Event()

    def source_pages(first: int, count: int) -> object:
        return ffi.buffer(ffi.cast("char *", src.base + first * PAGE_SIZE), count * PAGE_SIZE)

    def place(first: int, count: int, tally: dict[str, int]) -> None:
        placed = uffd.copy(dst.base + first * PAGE_SIZE, source_pages(first, count), count * PAGE_SIZE)
        tally["placed"] += placed.pages
        tally["eexist"] += placed.existed

    def placer() -> None:
        for first in range(0, spec.pages, chunk_pages):
            place(first, min(chunk_pages, spec.pages - first), placer_tally)

    def fault_resolver() -> None:
        while not done.is_set():
            select.select([uffd.fd], [], [], 0.05)
            for addr, _tid in uffd.read_faults():
                fault_tally["faults"] += 1
                place((addr - dst.base) // PAGE_SIZE, 1, fault_tally)

    threads = [threading.Thread(target=placer), threading.Thread(target=fault_resolver)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + WATCHDOG_S
    while dst.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    hung = dst.running()
    threads[0].join(timeout=WATCHDOG_S)
    done.set()
    threads[1].join(timeout=WATCHDOG_S)
    assert not hung, f"a vCPU hung for {WATCHDOG_S} s: a fault was lost"
    dst.join()
    # The kernel placed every page exactly once, whoever asked first.
    assert placer_tally["placed"] + fault_tally["placed"] == spec.pages
    assert dst.steps() == target
    assert replay(spec, target) == (dst.digest(), dst.export_state())
    counts = {"faults": fault_tally["faults"], "eexist_placer": placer_tally["eexist"],
              "eexist_faults": fault_tally["eexist"], "stalls": dst.stalls().count}
    uffd.close()
    src.close()
    dst.close()
    return counts


@pytest.mark.parametrize("pages,vcpus,workload,chunk", [
    (4096, 2, Workload.uniform, 1),
    (4096, 4, Workload.hotset, 8),
    (16384, 2, Workload.sequential, 64),
    (32768, 3, Workload.readmostly, 16),
    (65536, 2, Workload.uniform, 256),
])
def test_placer_and_faults_race_without_page_state(pages: int, vcpus: int, workload: Workload, chunk: int) -> None:
    counts = migrate_in_process(GuestSpec(pages=pages, vcpus=vcpus, workload=workload, seed=pages),
                                extra_steps=200_000, chunk_pages=chunk)
    REPORT.append(f"race {workload.name:10} {pages:6} pages, {vcpus} vCPUs: {counts['faults']} faults, "
                  f"-EEXIST {counts['eexist_placer']} to the placer + {counts['eexist_faults']} to the fault "
                  f"thread, {counts['stalls']} vCPU stalls, digest == replay")
    assert counts["faults"] > 0 and counts["stalls"] > 0
    # Pages a fault placed first are refused to the placer (and vice versa):
    # the race is real, resolved by the kernel, and nothing was lost.
    assert counts["eexist_placer"] + counts["eexist_faults"] > 0
