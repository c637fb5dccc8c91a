"""A VMM stand-in: restores a snapshot as Firecracker does with a ``Uffd`` memory backend, then proves it.

Firecracker's restore (``guest_memory_from_uffd`` in ``src/vmm/src/persist.rs``): map the guest's
memory fresh (nothing filled), create a userfaultfd (``O_CLOEXEC | O_NONBLOCK``, ``UFFDIO_API`` with
``UFFD_FEATURE_EVENT_REMOVE``), register every region for MISSING faults, connect to the handler's
Unix socket and send the one handoff message with the userfaultfd (``migrate.handoff``), then
restore the vCPUs' state and resume them.  Every page the guest touches faults until the handler
places it.  The stand-in does exactly that with the demo guest: the CPU state comes from the
snapshot's ``state.json``, the memory only from the handler.

Then the proof, as for a migration: the vCPUs run, stop, and the memory's digest (computed by C
in a worker thread; pages still missing fault and are served by the handler) and the vCPUs'
states must equal a replay of the workload to the same steps.

The stand-in never closes the handoff connection nor its userfaultfd while a page may be
missing (it would read as zeros).  A handler that hangs up with pages missing, or places none
while something waits for one for ``timeout`` seconds, ends it with one line.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from . import handoff, snapshot
from ._native import lib
from .errors import PeerError, PeerGone, UsageError
from .guest import Guest, GuestSpec, replay
from .handoff import Region
from .memory import require_missing
from .metrics import rss_mib
from .stats import RestoreStats
from .uffd import Userfaultfd

log = logging.getLogger(__name__)

# How often the watchdog looks at the vCPUs and at the pages present (one PAGEMAP_SCAN, a few ms per GiB).
_WATCH_S = 0.1


@dataclass(frozen=True)
class VmmConfig:
    """What migrate-vmm runs with."""

    snapshot: Path
    handoff: Path
    firecracker: str = "1.12"
    regions: int = 1
    seconds: float = 1.0
    timeout: float = 10.0
    remove: int = 0  # ranges dropped (MADV_DONTNEED / MADV_REMOVE) while the handler fills the memory


def removals(spec: GuestSpec, n: int) -> list[tuple[int, int]]:
    """``n`` runs of wire pages to drop, as a balloon would: 1 to 16 pages each (1 or 2 huge pages), spread
    over the guest, the same for the same guest (seeded by its seed)."""
    rng = random.Random(spec.seed)
    most = 2 if spec.memory.page_size > 4096 else 16
    runs = []
    for _ in range(n):
        count = rng.randint(1, min(most, spec.wire_pages))
        runs.append((rng.randrange(spec.wire_pages - count + 1), count))
    return runs


def split(base: int, spec: GuestSpec, n: int) -> list[Region]:
    """The guest at ``base`` as ``n`` regions of whole pages, adjacent, each with its own offset.

    Raises:
        UsageError: ``n`` is not within 1 and the guest's pages (at most ``handoff.MAX_REGIONS``).
    """
    pages, page = spec.wire_pages, spec.memory.page_size
    most = min(pages, handoff.MAX_REGIONS)
    if not 1 <= n <= most:
        raise UsageError(f"--regions {n}: this guest splits into 1 to {most} regions",
                         hint=f"a region is whole {page >> 10} KiB pages, and a handoff message has at most "
                              f"{handoff.MAX_REGIONS}")
    bounds = [i * pages // n for i in range(n + 1)]
    return [Region(base + a * page, (b - a) * page, a * page, page) for a, b in zip(bounds, bounds[1:])]


class Restore:
    """One restore: the guest, its userfaultfd, the connection to the handler, and what they did."""

    def __init__(self, cfg: VmmConfig) -> None:
        self.cfg = cfg
        self.snap = snapshot.load_state(cfg.snapshot)
        self.spec = self.snap.spec
        page = self.spec.memory.page_size
        try:  # the version's message can describe this guest's pages (before 1.7: no huge pages)
            handoff.encode([Region(0, page, 0, page)], cfg.firecracker)
        except ValueError as exc:
            raise UsageError(f"--firecracker {cfg.firecracker}: {exc}",
                             hint="the handoff came in Firecracker 1.1; huge pages need 1.7 or later") from None
        self.digesting = False

    async def run(self) -> RestoreStats:
        """Restores the snapshot through the handler, runs the guest, stops it and proves it.

        Raises:
            PeerError: the handler is not there, hung up with pages missing, or placed nothing for
                ``timeout`` seconds while a vCPU or the digest waited.

        **Cancellation**: asks the vCPUs to stop; one asleep in a fault stays asleep (the userfaultfd
        is never closed while a page may be missing) until the process exits.
        """
        spec = self.spec
        uffd = Userfaultfd(want=lib.uffd_vmm_features(spec.memory))
        require_missing(spec.memory, uffd.features)
        guest = Guest(spec, fill=False)
        regions = split(guest.base, spec, self.cfg.regions)
        for r in regions:
            uffd.register(r.base, r.size)
        guest.import_state(list(self.snap.cpu))
        guest.time_stalls(True)  # any access may wait for the handler: time them all
        guest.start(gated=True)  # threads ready ahead of time: resuming is one wake-up
        try:
            conn = trio.socket.from_stdlib_socket(
                handoff.send(self.cfg.handoff, regions, uffd.fd, self.cfg.firecracker))
            sent_ns = time.monotonic_ns()
            removed = await self._remove(guest) if self.cfg.remove else []
            guest.release()
            log.info("handed %d region(s) of %d MiB (%s, %d KiB pages) to the handler at %s as Firecracker %s; "
                     "%d vCPUs resumed at steps %s", len(regions), spec.size >> 20, spec.memory.name,
                     spec.memory.page_size >> 10, self.cfg.handoff, self.cfg.firecracker, spec.vcpus,
                     self.snap.steps())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_handler, conn, guest)
                nursery.start_soon(self._watchdog, guest)
                await trio.sleep(self.cfg.seconds)
                await trio.to_thread.run_sync(guest.stop, abandon_on_cancel=True)
                present = guest.present_pages()
                self.digesting = True
                digest = await trio.to_thread.run_sync(guest.digest, abandon_on_cancel=True)
                nursery.cancel_scope.cancel()
        except BaseException:
            guest.request_stop()  # never close the uffd: a missing page would read as zeros
            raise
        steps, stalls = guest.steps(), guest.stalls()
        first = guest.first_step_ns()
        rss = rss_mib()  # before the replay, which maps a second guest
        log.info("vCPUs stopped at steps %s; %d of %d pages were present then; replaying to prove it", steps,
                 present, spec.wire_pages)
        want_digest, want_state = await trio.to_thread.run_sync(
            replay, spec, steps, (self.snap.steps(), removed) if removed else None)
        verified = digest == want_digest and guest.export_state() == want_state
        guest.close()
        uffd.close()  # every page is present: the digest read them all
        conn.close()
        return RestoreStats(
            firecracker=self.cfg.firecracker, regions=len(regions), memory=spec.memory.name,
            page_size=spec.memory.page_size, pages_total=spec.wire_pages, guest_mib=spec.size / 2**20,
            vcpus=spec.vcpus, workload=spec.workload.name,
            first_step_ms=None if first is None else round((first - sent_ns) / 1e6, 3), run_s=self.cfg.seconds,
            vcpu_steps=tuple(steps), steps_run=sum(steps) - sum(self.snap.steps()),
            pages_present_after_run=present, vcpu_stall_us=stalls.summary(), verified=verified, rss_mib=rss)

    async def _remove(self, guest: Guest) -> list[tuple[int, int]]:
        """Drops ``--remove`` ranges of the memory while the handler streams it in, before the vCPUs resume
        (so the replay knows what they read): the kernel tells the handler (``UFFD_EVENT_REMOVE``), and each
        range must read as zeros from then on, whatever the handler had under way.  Starts once a tenth of
        the memory is there, so that much of the stream is still to come."""
        spec, page = self.spec, self.spec.memory.page_size
        with trio.move_on_after(self.cfg.timeout):
            while guest.present_pages() < spec.wire_pages // 10:
                await trio.sleep(0.001)
        runs = removals(spec, self.cfg.remove)

        def drop() -> None:  # each madvise waits until the handler has read the event
            for first, count in runs:
                if lib.region_discard(guest.base + first * page, count * page, spec.memory) < 0:
                    raise UsageError(f"dropping pages {first}+{count} failed")
        await trio.to_thread.run_sync(drop, abandon_on_cancel=True)
        log.info("dropped %d ranges (%d pages) while the handler filled the memory", len(runs),
                 sum(count for _, count in runs))
        return runs

    async def _watch_handler(self, conn: trio.socket.SocketType, guest: Guest) -> None:
        """Ends the restore when the handler hangs up before every page is present.

        Firecracker never reads this socket; anything the handler writes is dropped.
        """
        while await conn.recv(4096):
            pass
        missing = self.spec.wire_pages - guest.present_pages()
        if missing:
            raise PeerGone(f"the page-fault handler hung up with {missing} of {self.spec.wire_pages} pages still "
                           "missing", hint="see the handler's own error; the guest cannot go on without them")
        log.info("the page-fault handler hung up, every page placed")

    async def _watchdog(self, guest: Guest) -> None:
        """Ends the restore when something waits for a page and the handler has placed none for ``timeout``."""
        timeout = self.cfg.timeout
        present, since = guest.present_pages(), trio.current_time()
        while True:
            await trio.sleep(_WATCH_S)
            now, count = trio.current_time(), guest.present_pages()
            if count != present:
                present, since = count, now
            stuck = guest.stuck(int(timeout * 1e9))
            if stuck:
                i, seconds, page = stuck[0]
                raise PeerError(f"vCPU {i} has waited {seconds:.1f} s for page {page}: the page-fault handler "
                                "placed none", hint="is the handler serving the userfaultfd? (--timeout S)")
            if self.digesting and present < self.spec.wire_pages and now - since > timeout:
                raise PeerError(f"the page-fault handler placed no page for {timeout:g} s with "
                                f"{self.spec.wire_pages - present} still missing",
                                hint="is the handler serving the userfaultfd? (--timeout S)")


async def restore(cfg: VmmConfig) -> RestoreStats:
    """Restores the snapshot of ``cfg`` through its handler and proves it: ``Restore(cfg).run()``."""
    return await Restore(cfg).run()
