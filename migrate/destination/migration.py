"""migrate-dst's phases: join, the rounds (if any), switch over, postcopy, close, run after, verify, statistics.

Each phase is a method named for it; connecting is ``connect.py``'s job, the
native loops ``plane.py``'s.  A lost link before the switchover or during
postcopy is recovered from the same way: close, reconnect, tell the source
what the kernel still lacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import time

import trio

from .. import handoff
from .. import protocol as p
from ..errors import MigrateError, PeerError, RemoteProtocolError, UffdError, UsageError, lost_link
from ..guest import Guest, GuestSpec, replay
from ..memory import Memory, require_missing
from ..metrics import Histogram, StallHistogram, memory_held, rss_mib
from ..progress import Progress, placed_line
from ..stats import DestinationCounters, DestinationStats, Hops, MemoryHeld, Recovery
from ..uffd import Userfaultfd
from ..wire import FrameSocket
from .config import DestinationConfig
from .connect import Connector, Links
from .plane import Plane, Region
from .vmm_memory import VmmMemory

log = logging.getLogger(__package__)

Served = Guest | VmmMemory  # the memory the phases fill: a guest of our own, or a VMM's (--handoff)

# Samples of the placed-pages curves kept for plots: bounded, one per interval.
TIMELINE_INTERVAL = 0.1
MAX_TIMELINE = 10_000


class Destination:
    """The destination side of one migration."""

    def __init__(self, cfg: DestinationConfig) -> None:
        self.cfg = cfg
        self.connector = Connector(cfg)
        self.plane = Plane(cfg.idle_ms, cfg.prefetch)
        self.progress = Progress()
        self.timeline: list[tuple[float, int, int]] = []  # (seconds since switchover, bulk pages, urgent pages)
        self.recoveries: list[Recovery] = []
        self.mode = p.Mode.postcopy
        self.page_size = p.PAGE_SIZE  # the wire page, the memory's: GuestInfo says
        self.started = False  # the CPU state arrived and the vCPUs run: the switchover is done
        self.downtime_ns: int | None = None  # the source's figure (Downtime), once it came
        self.rounds_received = 0
        self.missing_at_switchover = 0
        self.discarded_at_switchover = 0
        self._switchover_deadline = 0.0  # trio's clock: the source must begin migrating by then
        self.vmm_pid: int | None = None  # --handoff: the VMM whose memory this fills
        self.holes_filled = 0  # --handoff: absent pages of removed ranges placed as zeros at the end

    def statistics(self) -> DestinationCounters:
        """The native loops' counters now: the progress line, the timeline and the final statistics read these."""
        return self.plane.statistics()

    async def run(self) -> DestinationStats:
        """Migrates the guest in, lets it run, and returns its statistics.

        **Cancellation**: stops the native loops through their eventfds and
        waits for them, and asks the vCPUs to stop; a vCPU asleep in a fault
        stays asleep, as the userfaultfd is never closed while a page may be
        missing (it would read as zeros).  The process is expected to exit.
        """
        t_connect = time.monotonic()
        guest, uffd, links = await self._join()
        try:
            cpu, links = await self._until_switchover(guest, links)
            t_switch = await self._switch_over(guest, cpu, links.bulk)
            links = await self._postcopy(guest, uffd, links, t_switch)
        except BaseException:
            # Never close the uffd and let vCPUs go on: a missing page would read as
            # zeros.  Those asleep in a fault stay asleep until the process exits.
            guest.request_stop()
            if isinstance(guest, VmmMemory) and (gone := guest.gone(within_ms=500)) is not None:
                raise gone from None  # what failed with it (a placement into memory that is no more) follows
            raise
        placement_s = time.monotonic() - t_switch
        steps_placed = guest.live_steps_each()  # where the vCPUs were as the last page arrived
        guest.time_stalls(False)  # every page is present: no access can stall any more
        self.progress.finish()
        now = self.statistics()
        if isinstance(guest, VmmMemory):  # a page placed, then removed by the VMM, counted but gone: ask its kernel
            now = dataclasses.replace(now, pages_placed=guest.present_pages())
        log.info("all %d pages placed in %.2f s: %d faults, %d requests, %d races absorbed by the kernel",
                 now.pages_placed, placement_s, now.faults, now.requests, now.eexist)
        await self._close(links, {"pages_placed": now.pages_placed, "faults": now.faults, "eexist": now.eexist})
        self.plane.detach()
        await self._run_after(guest, uffd)
        steps, stalls = guest.steps(), guest.stalls()
        rss = rss_mib()  # before the replay, which maps a second guest for the proof
        held = memory_held(guest.base, guest.spec.size)
        verified = await self._verify(guest, steps)
        guest.close()
        return self._final_statistics(guest.spec, now, verified=verified,
                                      placement_s=placement_s, connect_s=time.monotonic() - t_connect,
                                      steps=steps, steps_placed=steps_placed, stalls=stalls, rss=rss,
                                      held=held)

    async def _join(self) -> tuple[Served, Userfaultfd, Links]:
        """Opens the session (its bulk connection learns the guest), maps and registers the guest (or, with
        ``--handoff``, takes a VMM's memory and userfaultfd first), opens the other two connections, and
        readies the vCPUs to resume."""
        # Before connecting, a machine that cannot take the guest says so at once; and a VMM comes first, as
        # the source switches over once every connection is up, and wants the vCPUs running soon after.
        vmm = await self._wait_for_vmm(self.cfg.handoff) if self.cfg.handoff else None
        uffd = Userfaultfd() if vmm is None else Userfaultfd.adopt(vmm.uffd)
        try:
            deadline = trio.current_time() + self.cfg.connect_timeout
            bulk = await self.connector.open(p.Channel.BULK, deadline)
            self._switchover_deadline = trio.current_time() + self.cfg.switchover_timeout
            try:
                info = await bulk.expect(p.GuestInfo, within=self.cfg.link_timeout)  # follows the Welcome
                self.connector.info = info
                self.page_size = info.page_size
                self.mode = info.mode
                guest = self._map_guest(info, uffd) if vmm is None else self._serve_vmm(vmm, info, uffd)
            except BaseException:
                bulk.close()
                raise
        except BaseException:
            if vmm is not None:  # nothing was placed: the VMM's vCPUs wait, and its hangup tells it
                uffd.close()
                vmm.conn.close()
            raise
        links = await self.connector.open_links(bulk, deadline)
        spec = guest.spec
        log.info("guest of %d pages of %d KiB (%d MiB, %s), %d vCPUs, %s; %s migration; waiting for %s",
                 spec.wire_pages, info.page_size >> 10, spec.size >> 20, spec.memory.name, spec.vcpus,
                 spec.workload.name, self.mode.name,
                 "switchover" if self.mode is p.Mode.postcopy else "the precopy rounds")
        # Until every page is here, any access may stall; in precopy none can.
        guest.time_stalls(self.mode is not p.Mode.precopy)
        guest.start(gated=True)  # threads ready ahead of time: resuming is one wake-up
        return guest, uffd, links

    def _map_guest(self, info: p.GuestInfo, uffd: Userfaultfd) -> Guest:
        """Maps an empty guest of our own for what the source describes, and registers it with ``uffd``."""
        spec = GuestSpec.from_info(info, self.cfg.memory)
        if spec.memory.page_size != info.page_size:
            raise UsageError(f"--memory {spec.memory.name} cannot take the source's {Memory(info.memory).name} guest "
                             f"({info.page_size >> 10} KiB pages): a wire page must be the memory's page",
                             hint="leave --memory out (the source's kind), or use anon or memfd for a 4 KiB guest")
        if spec.memory is Memory.hugetlb and self.cfg.prefetch:
            raise UsageError("--prefetch asks for 4 KiB neighbours; a hugetlb guest's page is already 2 MiB",
                             hint="leave --prefetch out for a hugetlb guest")
        require_missing(spec.memory, uffd.features)
        guest = Guest(spec, fill=False)
        uffd.register(guest.base, spec.size)
        self.plane.attach(uffd.fd, [Region(guest.base, 0, spec.wire_pages)], spec.memory)
        return guest

    async def _wait_for_vmm(self, path: str) -> handoff.Handoff:
        """Waits (``--handoff-timeout``) for one VMM to hand its memory over on the Unix socket ``path``."""
        listener = handoff.Listener(path)
        log.info("waiting for a VMM on %s", path)
        try:
            return await listener.accept(self.cfg.handoff_timeout)
        finally:
            listener.close()

    def _serve_vmm(self, vmm: handoff.Handoff, info: p.GuestInfo, uffd: Userfaultfd) -> VmmMemory:
        """Points the loops at the VMM's regions and userfaultfd, once they are checked against ``info``."""
        memory = VmmMemory(vmm, info)
        self.plane.attach(uffd.fd, memory.regions, memory.spec.memory, memory.pagemap_fd)
        self.vmm_pid = vmm.pid
        log.info("VMM pid %d handed over %d region%s of %d KiB pages", vmm.pid, len(memory.regions),
                 "s" * (len(memory.regions) > 1), info.page_size >> 10)
        return memory

    async def _until_switchover(self, guest: Served, links: Links) -> tuple[p.CpuState, Links]:
        """Before switchover: places the precopy rounds (if any) until the CPU state arrives.

        Returns the CPU state and the live links.  A lost link reconnects with
        ``Resume(started=False)``: the source then sends the round under way
        again, or the whole switchover.

        **Cancellation**: stops the placer through its eventfd and waits for it.
        """
        deadline: float | None = None
        while True:
            placed_before = self.plane.placed_pages
            try:
                return await self._receive_rounds(links), links
            except trio.TooSlowError:
                failure: object = "the link went silent between rounds"
            except Exception as exc:  # as in postcopy: only a lost link is recovered from
                if (failure := lost_link(exc)) is None:
                    raise
            links, deadline = await self._recover(guest, links, failure, placed_before, deadline,
                                                  "before switchover ")

    async def _receive_rounds(self, links: Links) -> p.CpuState:
        """Places each round until the CPU state (the protocol's state allows only what may come next)."""
        bulk = links.bulk
        # Before the first round the source runs its guest for --run-before: bounded by
        # --switchover-timeout (a vanished host is noticed sooner: see wire.tune).  Between rounds
        # it only scans (milliseconds): silence then means a lost link.
        with trio.move_on_at(self._switchover_deadline) as wait:
            event = await bulk.receive()
        if wait.cancelled_caught:
            raise MigrateError(f"the source did not begin the migration within {self.cfg.switchover_timeout:g} s "
                               "of the connection", hint="raise --switchover-timeout above the source's "
                                                         "--run-before")
        while True:
            if isinstance(event, p.CpuState):
                return event
            assert isinstance(event, p.Round)
            self.rounds_received = max(self.rounds_received, event.number)
            discarded_before = self.statistics().pages_discarded
            self.progress.update(f"round {event.number}: {event.pages} pages"
                                 + (" (switchover)" if event.final else ""))
            await self.plane.run_placer(bulk)  # until the next control frame: RoundEnd, or the CpuState after the final
            if event.final:
                self.discarded_at_switchover = self.statistics().pages_discarded - discarded_before
            event = await bulk.receive()
            if isinstance(event, p.RoundEnd):
                await bulk.send(p.RoundAck(event.number))
                with trio.fail_after(self.cfg.link_timeout):
                    event = await bulk.receive()

    async def _switch_over(self, guest: Served, cpu: p.CpuState, bulk: FrameSocket) -> float:
        """Resumes the vCPUs from the CPU state and says so at once; returns when (time.monotonic()).

        The downtime is the source's to measure, on its clock: ``Running``
        tells it, ``Downtime`` answers (read by the placer, or after it).
        """
        guest.import_state(list(cpu.vcpus))
        guest.release()  # in postcopy before any page has arrived: every first touch faults
        with contextlib.suppress(PeerError):  # a lost link: the postcopy recovers, and Resume(started) says it
            await bulk.send(p.Running())
        t_switch = time.monotonic()
        self.started = True
        # Completion from here on: what the kernel holds now (after every discard), plus what the
        # loops place (they never discard after switchover, and the kernel never places a page
        # twice).  Asked after the release, outside the downtime (one walk, ~2 ms per GiB): until
        # the loops start a vCPU can only wait in a fault, and nothing places or drops a page.
        present = guest.present_pages()
        self.plane.rebase(present)
        pages = self.plane.pages
        self.missing_at_switchover = pages - present
        if self.mode is p.Mode.precopy and self.missing_at_switchover:
            # Never seen: the source sends every page before the CPU state, and the placer has
            # placed every frame before it. Should it happen, the postcopy path fetches the
            # pages on demand (never a page read as zeros), and the metrics show the faults.
            log.error("precopy switchover with %d pages missing; fetching them on demand",
                      self.missing_at_switchover)
        log.info("vCPUs running again; %d of %d pages present", self.plane.placed_pages, pages)
        return t_switch

    async def _postcopy(self, guest: Served, uffd: Userfaultfd, links: Links, t_switch: float) -> Links:
        """Places pages until all are there, reconnecting when a link breaks; returns the live links.

        **Cancellation**: stops the native loops (each through its eventfd) and
        waits for them; the guest's vCPUs stay where they are.
        """
        plane = self.plane
        deadline: float | None = None  # of the recovery under way: progress resets it
        async with trio.open_nursery() as watching:
            watching.start_soon(self._watchdog, guest)
            if isinstance(guest, VmmMemory):
                watching.start_soon(self._watch_vmm, guest)
            while True:
                placed_before = plane.placed_pages
                try:
                    if plane.placed_pages >= plane.pages:
                        break  # precopy, or nothing was written after the last round
                    async with trio.open_nursery() as nursery:
                        streamed = trio.Event()
                        nursery.start_soon(self._place_stream, links.bulk, streamed)
                        nursery.start_soon(plane.fault_reader, links.requests)
                        nursery.start_soon(plane.reply_placer, links.replies)
                        nursery.start_soon(self._watch_progress, t_switch, guest)
                        await plane.wait_done()
                        if isinstance(guest, VmmMemory) and plane.removes[0]:
                            await self._fill_removed(guest, uffd, streamed)
                        nursery.cancel_scope.cancel()
                    break
                except Exception as exc:
                    failure = lost_link(exc)
                    if failure is None:
                        raise  # a bug, a local failure or a protocol violation: never taken for a lost link
                    if plane.placed_pages == plane.pages:
                        break  # a link broke as the last page arrived: nothing is missing
                links, deadline = await self._recover(guest, links, failure, placed_before, deadline, "")
            watching.cancel_scope.cancel()
        if links.bulk.conn.state is p.State.REPORTED:  # every page came before the source's answer (precopy)
            with contextlib.suppress(PeerError):  # the figure is lost with the link, not the migration
                self._took(await links.bulk.expect(p.Downtime, within=self.cfg.link_timeout))
        return links

    async def _place_stream(self, bulk: FrameSocket, streamed: trio.Event) -> None:
        """The placer, until the source says the stream is complete (``streamed`` is then set)."""
        await self.plane.placer(bulk, self._took)
        streamed.set()

    async def _fill_removed(self, vmm: VmmMemory, uffd: Userfaultfd, streamed: trio.Event) -> None:
        """After a VMM removed memory, the counters overcount (a page placed, then removed, counted but gone):
        its page tables say what is still absent.  Once the stream is complete every page not removed was
        placed, so what is absent lies in removed ranges, which read as zeros: placed as zero pages.

        The fault reader runs meanwhile: a placement that finds the layout changing (``-EAGAIN``: a remove
        event not read yet) waits for it to read the event."""
        await streamed.wait()  # the placer's own silence bound ends it if the source goes quiet
        removed = self.plane.removed_runs()  # merged: a hole in removed ranges lies in one of them
        holes = vmm.absent_runs()
        page = self.page_size
        for start, count in holes:
            if not any(s <= start and start + count <= s + n for s, n in removed):
                raise MigrateError(f"pages {start}..{start + count - 1} of the VMM are absent after the stream's "
                                   "end, and the VMM never removed them", hint="this is a bug: please report it")
            for addr, pages in vmm.addresses(start, count):
                while True:
                    try:
                        uffd.zeropage(addr, pages * page, page)
                        break
                    except UffdError as exc:
                        if exc.errno != errno.EAGAIN:
                            raise
                        await trio.sleep(0.001)  # a remove under way: the fault reader reads it
        self.holes_filled = sum(count for _, count in holes)
        events, pages = self.plane.removes
        log.info("the VMM removed %d pages in %d events; %d absent ones placed as zero pages at the end",
                 pages, events, self.holes_filled)

    def _took(self, answer: p.Downtime) -> None:
        """The source's downtime, measured on its clock from its vCPUs' stop to our ``Running``."""
        self.downtime_ns = answer.ns
        log.info("downtime %.2f ms, as the source measured it: its vCPUs' stop to our report that they run",
                 answer.ns / 1e6)

    async def _recover(self, guest: Served, links: Links, failure: object, placed_before: int,
                       deadline: float | None, when: str) -> tuple[Links, float]:
        """Closes the lost links, reconnects, and tells the source what the kernel still lacks.

        One deadline per outage: it restarts only once pages arrived since the
        last loss, so a link that keeps failing at once cannot loop for ever.
        """
        links.close()
        self.progress.finish()
        plane = self.plane
        if deadline is None or plane.placed_pages > placed_before:
            deadline = trio.current_time() + self.cfg.reconnect_timeout
        log.warning("lost the source %s(%s) with %d of %d pages here; reconnecting for up to %g s", when,
                    failure, plane.placed_pages, plane.pages, self.cfg.reconnect_timeout)

        def how_far() -> str:
            placed, total = plane.placed_pages, plane.pages
            return (f"{placed} of {total} pages ({100 * placed / total:.1f}%) had arrived; the guest is "
                    "stopped here and its memory is incomplete")

        links, reconnect_s = await self.connector.reconnect(deadline, how_far)
        # The kernel's page tables, after every discard so far, are the whole record of what is missing.
        runs = guest.absent_runs()
        missing = sum(n for _, n in runs)
        for i in range(0, max(len(runs), 1), p.MAX_RESUME_RUNS):
            await links.bulk.send(p.Resume(tuple(runs[i:i + p.MAX_RESUME_RUNS]),
                                           more=i + p.MAX_RESUME_RUNS < len(runs), started=self.started))
        if self.started:
            # What a vCPU waits for is its own state (per vCPU, not per page): no record of what was asked
            # before is needed to ask again.
            pages = sorted({page for _, _, page in guest.stuck(0)})
            await plane.ask_again(pages, links.requests)
            if pages:
                log.info("asked again for the %d pages vCPUs are waiting on", len(pages))
        self.recoveries.append(Recovery(reconnect_s=round(reconnect_s, 3), pages_missing=missing))
        log.info("reconnected after %.2f s; the kernel lacks %d pages in %d runs, asked the source for them",
                 reconnect_s, missing, len(runs))
        return links, deadline

    async def _close(self, links: Links, counters: dict[str, float]) -> None:
        """Tells the source every page is here, then waits for it to close first.

        DestDone goes after the last request, on the requests connection, whose
        only reader at the source is the request server.  The source closes its
        connections once it has read DestDone; closing ours only after that
        means our close can never look like a lost link to it.  Bounded by
        ``link_timeout``.
        """
        try:
            await links.requests.send(p.DestDone(counters))
        except (PeerError, RemoteProtocolError):
            pass  # closed, as expected
        else:
            with trio.move_on_after(self.cfg.link_timeout):
                async with trio.open_nursery() as nursery:
                    # Stream frames and replies still in flight are duplicates: skip them, on both, or the
                    # source's request server may block writing a reply (2 MiB pages fill a socket buffer
                    # in a few) and never read DestDone.
                    nursery.start_soon(_drain, links.bulk)
                    nursery.start_soon(_drain, links.replies)
        links.close()

    async def _run_after(self, guest: Served, uffd: Userfaultfd) -> None:
        """Lets the guest run here for ``--run-after``, then stops it."""
        await trio.sleep(self.cfg.run_after)
        await trio.to_thread.run_sync(guest.stop)
        uffd.close()  # safe only now: every page is present, none can read as zeros

    async def _verify(self, guest: Guest, steps: list[int]) -> bool | None:
        """With ``--verify``: whether the guest's memory and state equal a replay of ``steps`` without migration."""
        if not self.cfg.verify:
            return None
        log.info("verifying: replaying %s steps without migration", steps)
        digest = await trio.to_thread.run_sync(guest.digest)
        want_digest, want_state = await trio.to_thread.run_sync(replay, guest.spec, steps)
        return digest == want_digest and guest.export_state() == want_state

    async def _watchdog(self, guest: Served) -> None:
        """Names any vCPU stuck in one access (a fault) for longer than the threshold."""
        limit = self.cfg.watchdog
        while True:
            await trio.sleep(limit)
            for index, seconds, page in guest.stuck(int(limit * 1e9)):
                log.warning("watchdog: vCPU %d has waited %.1f s for page %d (address %#x)", index, seconds, page,
                            guest.base + page * self.page_size)

    async def _watch_vmm(self, vmm: VmmMemory) -> None:
        """Ends the migration with one line when the VMM exits: it keeps its connection open while it lives
        (anything it sends is dropped)."""
        while await vmm.handoff.conn.recv(4096):
            pass
        raise vmm.gone(within_ms=0) or PeerError(f"the VMM (pid {vmm.handoff.pid}) hung up")

    async def _watch_progress(self, t0: float, guest: Served) -> None:
        """Samples the placed-pages timeline and redraws the progress line, from ``statistics()``."""
        def line() -> str:  # built only when drawn (a terminal), and once more by finish() for the final figures
            now, elapsed = self.statistics(), max(time.monotonic() - t0, 1e-9)
            return placed_line(now.pages_placed, now.pages_total, now.pages_placed * self.page_size / elapsed / 1e6,
                               now.faults / elapsed, guest.stalls().percentile_us(0.5), now.eexist)

        while True:
            now = self.statistics()
            if len(self.timeline) < MAX_TIMELINE:
                self.timeline.append((round(time.monotonic() - t0, 3), now.pages_placed_bulk,
                                      now.pages_placed_urgent))
            self.progress.update(line)
            await trio.sleep(TIMELINE_INTERVAL)

    def _final_statistics(self, spec: GuestSpec, now: DestinationCounters, *, verified: bool | None,
                          placement_s: float, connect_s: float, steps: list[int],
                          steps_placed: list[int], stalls: StallHistogram, rss: float,
                          held: MemoryHeld | None = None) -> DestinationStats:
        """The metrics, from the counters as the last page arrived (``now``) and the guest's own figures."""
        urgent = self.plane.c.urgent
        return DestinationStats(
            mode=self.mode.name, precopy_rounds=self.rounds_received,
            pages_missing_at_switchover=self.missing_at_switchover,
            pages_replaced=now.pages_replaced, pages_discarded=now.pages_discarded,
            pages_discarded_at_switchover=self.discarded_at_switchover,
            placements=now.pages_placed_bulk + now.pages_placed_urgent,
            bytes_total=now.bytes_bulk + now.bytes_urgent + now.bytes_requests,
            pages_total=spec.wire_pages, pages_placed=now.pages_placed, verified=verified,
            memory=spec.memory.name, page_size=spec.memory.page_size,
            downtime_ms=None if self.downtime_ns is None else round(self.downtime_ns / 1e6, 3),
            total_s=round(placement_s, 3),
            connect_to_done_s=round(connect_s, 3),
            bytes_bulk=now.bytes_bulk, bytes_urgent=now.bytes_urgent, bytes_requests=now.bytes_requests,
            stream_gbps=round(now.bytes_bulk / max(placement_s, 1e-3) / 1e9, 3),
            faults=now.faults, requests=now.requests, pages_requested=now.pages_requested,
            eexist=now.eexist, eexist_bulk=now.eexist_bulk, eexist_urgent=now.eexist_urgent,
            pages_placed_bulk=now.pages_placed_bulk, pages_placed_urgent=now.pages_placed_urgent,
            zero_pages=now.zero_pages,
            vcpu_stall_us=stalls.summary(), fault_service_us=Histogram.from_c(urgent.service).summary(),
            hops_us=Hops(fault_to_request=Histogram.from_c(self.plane.c.faults.to_send).summary(),
                         network=Histogram.from_c(urgent.network).summary(),
                         source_held=Histogram.from_c(urgent.held).summary(),
                         reply_to_placed=Histogram.from_c(urgent.place).summary()),
            vcpu_steps=tuple(steps), vcpu_steps_at_placed=tuple(steps_placed), rss_mib=rss, memory_mib=held,
            guest_mib=spec.size / 2**20, workload=spec.workload.name, vcpus=spec.vcpus,
            recoveries=tuple(self.recoveries), connect_attempts=self.connector.attempts,
            tls=self.cfg.tls.negotiated if self.cfg.tls else "plaintext",
            tls_rekeys=self.cfg.tls.rekeys if self.cfg.tls else 0,
            placed_timeline=tuple(self.timeline),
            vmm_pid=self.vmm_pid, vmm_removes=self.plane.removes[0], vmm_removed_pages=self.plane.removes[1],
            vmm_holes_zeroed=self.holes_filled,
        )


async def _drain(fs: FrameSocket) -> None:
    """Reads and drops what ``fs`` still brings, until the peer closes it."""
    try:
        while True:
            await fs.receive()
    except (PeerError, RemoteProtocolError):
        pass  # closed, as expected
