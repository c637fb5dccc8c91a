"""migrate-src's two levels: ``Source`` runs the guest and admits a destination; ``Migration`` hands the guest over.

Each ``run`` is a short list of named phases; each phase is one module's job
(see the package's docstring for the map).  A lost link is not the end: the
session waits for the destination to reconnect, and the migration goes on
from the phase it was in (a switchover the destination confirmed is never
sent again).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import trio

from .. import protocol as p
from .. import stats
from .._native import lib
from ..dirty import DirtyTracker
from ..errors import PeerError, lost_link
from ..guest import Guest
from ..image import Image, image_guest
from ..memory import require_missing
from ..metrics import Histogram, memory_held, rss_mib
from ..progress import Progress
from ..stats import GuestPace, Round, SourceCounters, SourceStats
from ..uffd import Userfaultfd
from ..wire import FrameSocket, format_address
from .admission import Admission, Links, Session
from .config import SourceConfig
from .modes import Mode, choose
from .rounds import Rounds
from .scans import WORKING_SET_S, Scans
from .sender import Sender
from .server import RequestServer
from .streamer import Streamer
from .switchover import Switchover

log = logging.getLogger(__package__)


class Source:
    """The source side of one migration: runs the guest, admits one destination, and migrates the guest to it."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.mode = choose(cfg)
        sp = cfg.spec  # what a new session's bulk connection tells the destination, and every connection checks
        self.admission = Admission(cfg, sp.info(self.mode.wire))

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> SourceStats:
        """Runs the guest, migrates it once, and returns the source's statistics.

        **Cancellation**: stops every native loop through its eventfd and waits
        for its thread, so no thread is left sending from guest memory; the
        vCPUs stay as they are (running, or stopped after the switchover) and
        the sockets close with the process, which is expected to exit.
        """
        memory = self.cfg.spec.memory
        require_missing(memory, Userfaultfd.offered())  # the destination maps the same kind
        if self.mode.tracks_writes:  # an old kernel says so now, not after --run-before
            await trio.to_thread.run_sync(DirtyTracker.check, memory, self.mode.wire.name)
        if self.cfg.memory_file:
            guest: Guest | Image = Image(self.cfg.memory_file, *image_guest(self.cfg.memory_file, memory))
        else:
            guest = await trio.to_thread.run_sync(partial(Guest, self.cfg.spec, fill=True))
        guest.start()
        # --run-before counts guest time, not the fill before it; on trio's clock,
        # which is offset from time.monotonic() on purpose.
        migration = Migration(self.cfg, self.mode, guest, self.admission, t_guest=trio.current_time())
        listener = await self.admission.listen()
        port = listener.getsockname()[1]
        if self.cfg.memory_file:
            log.info("serving the memory image %s (%d MiB, %s pages); listening on %s", self.cfg.memory_file,
                     self.cfg.spec.size >> 20, memory.name, format_address(self.cfg.host, port))
        else:
            log.info("guest of %d MiB (%s) with %d vCPUs running %s; listening on %s", self.cfg.spec.size >> 20,
                     memory.name, self.cfg.spec.vcpus, self.cfg.spec.workload.name,
                     format_address(self.cfg.host, port))
        task_status.started(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.admission.accept_loop, listener)
            session = await self.admission.wait_paired()
            result = await migration.run(session)
            nursery.cancel_scope.cancel()
        listener.close()
        return result


@dataclass
class _Times:
    """When the phases began (trio's clock unless named otherwise) and the guest's steps then."""

    guest: float  # the guest started
    start: float = 0.0  # the migration began: the first round, or the switchover in postcopy
    stop: float = 0.0  # the vCPUs stopped
    switch: float = 0.0  # the same, time.monotonic()
    steps_start: int = 0
    steps_stop: int = 0


class Migration:
    """Hands a running guest over to the destination of one session, and serves its pages until it has all.

    Args:
        cfg: the options.
        mode: postcopy, hybrid or precopy, with the stream's order.
        guest: the running guest, or a memory image (a guest stopped all along).
        admission: the session's connections, and where a lost destination comes back.
        t_guest: when the guest started (trio's clock): ``--run-before`` counts from it.
    """

    def __init__(self, cfg: SourceConfig, mode: Mode, guest: Guest | Image, admission: Admission, *,
                 t_guest: float) -> None:
        self.cfg = cfg
        self.mode = mode
        self.guest = guest
        self.admission = admission
        self.times = _Times(guest=t_guest)
        self.progress = Progress()
        self.sender = Sender(guest.base, cfg.spec.wire_pages, cfg.spec.memory.page_shift, cfg.idle_ms,
                             cfg.max_bandwidth)
        self.server = RequestServer(self.sender)
        self.scans = Scans(guest.base, cfg.spec.wire_pages, cfg.spec.memory)
        self.rounds = Rounds(mode, max_rounds=cfg.precopy_rounds, switchover_ms=cfg.switchover_ms,
                             link_timeout=cfg.link_timeout, scans=self.scans, sender=self.sender,
                             statistics=self.statistics, progress=self.progress) if mode.rounds else None
        self.switchover = Switchover(mode, guest, self.scans, self.sender)
        self.streamer = Streamer(self.sender, self.server.notes, policy=cfg.prepage, max_bandwidth=cfg.max_bandwidth,
                                 link_timeout=cfg.link_timeout, statistics=self.statistics, progress=self.progress)
        self.cpu_state: p.CpuState | None = None  # set once the vCPUs are stopped
        self.stopped_at_ns = 0  # when the last vCPU stopped (time.monotonic_ns)
        self.downtime_ns: int | None = None  # measured at the destination's first report that its vCPUs run
        self.confirmed = False  # the destination said its vCPUs run (Resume.started)
        self.dest_counters: dict[str, float] = {}

    def statistics(self) -> SourceCounters:
        """The native loops' counters now: what the progress lines, the timeline and the final statistics show."""
        st, served, pacer = self.sender.stats, self.server.stats, self.sender.pacer
        return SourceCounters(pages_streamed=st.pages, bytes_streamed=st.bytes, pages_discarded=st.discards,
                              pages_requested=served.pages, bytes_urgent=served.bytes, requests=served.requests,
                              notes_dropped=self.server.notes.dropped, pacer_waits=pacer.waits,
                              pacer_waited_ns=pacer.waited_ns)

    async def run(self, session: Session) -> SourceStats:
        """The phases: run before, then (rounds, stop, switchover, postcopy) until the destination has every
        page, across lost links; then the statistics."""
        await self._run_before()
        self.times.start, self.times.steps_start = trio.current_time(), self.guest.live_steps()
        recoveries = 0
        resume: p.Resume | None = None
        while True:
            links = session.links()
            try:
                if recoveries:
                    resume = await self._receive_resume(links.bulk)
                if self.cpu_state is None:
                    if self.rounds is not None:
                        await self.rounds.run(links.bulk, resume)
                    await self._stop()
                    resume = None  # the rounds took what it said
                # The destination reports its vCPUs running after a CPU state; after Resume(started) it had.
                reports = resume is None or not resume.started
                await self._switch_over(links.bulk, resume)
                await self._postcopy(links, reports)
                failure = None
            except Exception as exc:
                failure = lost_link(exc)
                if failure is None:
                    raise
            # Closing after DestDone is the clean end: the destination waits for it.
            session.close()
            if failure is None:
                break
            recoveries += 1
            await self._wait_for_return(failure)
        self.progress.finish()
        self.scans.close()
        return self._final_statistics(recoveries)

    async def _run_before(self) -> None:
        """Lets the guest run for ``--run-before``: its pace until then is the baseline its pace during the
        rounds is measured against.  Postcopy in working-set order tracks writes over its last two stretches."""
        end = self.times.guest + self.cfg.run_before
        if self.mode.measures_working_set:
            await trio.sleep_until(end - 2 * WORKING_SET_S)
            await self.scans.start()
            await trio.sleep(WORKING_SET_S)
            await self.scans.take_stretch()
            await trio.sleep_until(max(end, trio.current_time() + WORKING_SET_S))
        else:
            await trio.sleep_until(end)

    async def _stop(self) -> None:
        """Stops the vCPUs and, with rounds, scans what they wrote since the last one: the final dirty set."""
        guest, scans, rounds = self.guest, self.scans, self.rounds

        def stop_and_scan() -> None:
            guest.stop()
            if rounds is not None:
                scans.take_at_stop()  # in the same thread: no extra hop inside the downtime

        await trio.to_thread.run_sync(stop_and_scan)
        self.times.stop, self.times.switch = trio.current_time(), time.monotonic()
        self.times.steps_stop = sum(guest.steps())
        if rounds is not None:
            rounds.stopped()
        # Downtime starts when the last vCPU stopped, on this host's monotonic clock, and ends with the
        # destination's report that its vCPUs run (Running): one clock.
        self.stopped_at_ns = guest.stopped_at_ns()
        self.cpu_state = p.CpuState(tuple(guest.export_state()))

    async def _switch_over(self, bulk: FrameSocket, resume: p.Resume | None) -> None:
        """Sends the switchover (unless the destination has it) and sets what the stream then sends."""
        assert self.cpu_state is not None
        rounds = self.rounds.planner.round if self.rounds is not None else 0
        if resume is None or not resume.started:  # a Running report will follow the CPU state: stamp its
            lib.link_stamp_arrivals(bulk.sock.fileno(), 1)  # arrival, not when we get to read it
        remaining, first = await self.switchover.send(bulk, self.cpu_state, self.stopped_at_ns, resume, rounds)
        self.streamer.reset(remaining, first)

    async def _postcopy(self, links: Links, reports: bool) -> None:
        """Streams what is left and serves requests until the destination says it has every page; first, when
        ``reports``, reads the destination's report that its vCPUs run (requests are served meanwhile)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.streamer.sample, self.times.switch)
            nursery.start_soon(self._stream, links.bulk, reports)
            self.dest_counters = await self.server.serve(links.requests, links.replies)
            nursery.cancel_scope.cancel()

    async def _stream(self, bulk: FrameSocket, reports: bool) -> None:
        """The stream, after the destination's report and our downtime when ``reports`` (one RTT later than
        at once: requests are served meanwhile, and the resuming vCPUs do not share the CPUs with it)."""
        if reports:
            with trio.move_on_after(self.cfg.link_timeout):
                await trio.lowlevel.wait_readable(bulk.sock)  # nothing else comes on bulk before Running
            arrived = lib.link_arrival_ns(bulk.sock.fileno())
            await bulk.expect(p.Running, within=self.cfg.link_timeout)
            lib.link_stamp_arrivals(bulk.sock.fileno(), 0)
            self._measure_downtime(bulk, arrived)
            await bulk.send(p.Downtime(self.downtime_ns or 0))
        await self.streamer.stream(bulk)

    def _measure_downtime(self, bulk: FrameSocket, arrived: int = 0) -> None:
        """From the vCPUs' stop to the destination's report that its vCPUs run, when it arrived here (the
        kernel's stamp; else now), both on this host's clock, less half the connection's smoothed round trip
        (the report's way back): no two hosts' clocks compared."""
        if self.downtime_ns is None:
            back_ns = lib.link_rtt_us(bulk.sock.fileno()) * 500
            self.downtime_ns = max(0, (arrived or time.monotonic_ns()) - self.stopped_at_ns - back_ns)
            log.info("the destination's vCPUs run: downtime %.2f ms (their stop here to its report, less %.2f ms "
                     "for the report's way back)", self.downtime_ns / 1e6, back_ns / 1e6)
        self.confirmed = True

    async def _receive_resume(self, bulk: FrameSocket) -> p.Resume:
        """After a reconnection: what the destination's kernel lacks, and whether its vCPUs run."""
        runs: list[tuple[int, int]] = []
        while True:
            # The protocol's state bounds the pages of all the frames by the guest's; as a run holds a
            # page at least, that bounds the run list too, however many frames say "more".
            resume = await bulk.expect(p.Resume, within=self.cfg.link_timeout)
            runs += resume.runs
            if not resume.more:
                break
        if resume.started:
            self._measure_downtime(bulk)  # its first report, when Running was lost with the link
        pages = sum(count for _, count in runs)
        log.info("destination back: it lacks %d pages in %d runs; its vCPUs %s", pages, len(runs),
                 "run" if resume.started else "wait for the switchover")
        return p.Resume(tuple(runs), started=resume.started)

    async def _wait_for_return(self, failure: object) -> None:
        """Waits for the lost destination to reconnect; if it does not, says where the guest is.

        Once its vCPUs are stopped, the guest is never resumed here on our own:
        the CPU state may have arrived and the guest may run there, and two
        running copies would diverge.
        """
        self.progress.finish()
        log.warning("lost the destination (%s); waiting up to %g s for it to reconnect", failure,
                    self.cfg.reconnect_timeout)
        if await self.admission.wait_rejoined(self.cfg.reconnect_timeout):
            return
        if self.cpu_state is None:
            where = "the guest never left this host (it was still running here)"
        elif self.confirmed or self.statistics().requests:
            where = "the guest runs there with incomplete memory, and is stopped here"
        else:
            where = ("the switchover was sent but never confirmed: the guest may run there; it stays "
                     "stopped here, as two running copies would diverge")
        raise PeerError(f"the destination did not come back within {self.cfg.reconnect_timeout:g} s; {where}",
                        hint="restart the migration from scratch")

    def _final_statistics(self, recoveries: int) -> SourceStats:
        t, now, cfg, spec = self.times, self.statistics(), self.cfg, self.cfg.spec
        total_s = time.monotonic() - t.switch
        before = t.steps_start / max(t.start - t.guest, 1e-9)
        during = ratio = None
        if self.rounds is not None:
            during = (t.steps_stop - t.steps_start) / max(t.stop - t.start, 1e-9)
            # The live count moves by up to 1024 steps per vCPU (64 when rate-limited): a ratio from
            # fewer than a hundred such strides is noise.
            if t.steps_start >= 100 * (64 if spec.rate else 1024) * spec.vcpus:
                ratio = round(during / before, 3)
        sw, streamer = self.switchover, self.streamer
        result = SourceStats(
            mode=self.mode.wire.name, stream_order=self.mode.order.value,
            pages_streamed=now.pages_streamed, pages_requested=now.pages_requested, requests=now.requests,
            rejected_peers=self.admission.rejected_peers, dropped_peers=self.admission.dropped_peers,
            pages_total=spec.wire_pages, total_s=round(total_s, 3),
            memory=spec.memory.name, page_size=spec.memory.page_size,
            migration_s=round(trio.current_time() - t.start, 3),
            precopy_s=round(t.stop - t.start, 3) if during is not None else 0.0,
            bytes_bulk=now.bytes_streamed, bytes_urgent=now.bytes_urgent,
            bytes_sent_total=now.bytes_streamed + now.bytes_urgent, recoveries=recoveries,
            tls=cfg.tls.negotiated if cfg.tls else "plaintext", tls_rekeys=cfg.tls.rekeys if cfg.tls else 0,
            request_held_us=Histogram.from_c(self.server.stats.held).summary(), notes_dropped=now.notes_dropped,
            max_bandwidth_bytes_per_s=cfg.max_bandwidth, prepage=cfg.prepage,
            prepage_stats=streamer.policy.statistics(), window_pages=streamer.window_pages,
            pacer_waits=now.pacer_waits, pacer_waited_ms=round(now.pacer_waited_ns / 1e6, 3),
            stream_timeline=tuple(streamer.timeline),
            rss_mib=rss_mib(), memory_mib=memory_held(self.guest.base, spec.size),
            guest_mib=spec.size / 2**20, vcpu_steps=tuple(self.guest.steps()),
            rounds=tuple(Round(**entry) for entry in self.rounds.entries) if self.rounds is not None else (),
            guest_steps_per_s=GuestPace(before=round(before), during_precopy=None if during is None else round(during),
                                        ratio=ratio),
            switchover=stats.Switchover(dirty_pages=self.scans.final.pages if self.scans.final else 0,
                                        pages_discarded=sw.discarded, stop_and_copy_pages=sw.stop_and_copy_pages,
                                        stopped_to_cpu_state_ms=round(sw.switch_ms, 3),
                                        working_set_pages=sw.working_set_pages),
            first_window=streamer.first_window,
        )
        log.info("done in %.2f s: %d pages streamed, %d sent on request (%d requests); destination placed %s",
                 total_s, now.pages_streamed, now.pages_requested, now.requests,
                 self.dest_counters.get("pages_placed", "?"))
        return result


async def serve(cfg: SourceConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> SourceStats:
    """Runs one source until its guest has been migrated; returns its statistics."""
    return await Source(cfg).run(task_status=task_status)
