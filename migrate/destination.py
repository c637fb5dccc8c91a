"""migrate-dst: resumes the guest at once and fills its memory behind it.

The kernel is the only bookkeeper.  Since ``userfaultfd_must_wait()``
re-checks the page tables after a faulting thread has queued itself, a fault
that races with a ``UFFDIO_COPY`` of the same page is never lost; so this side
keeps no per-page state at all:

- the *placer* places whatever the bulk stream brings;
- the *fault reader* asks the source for every faulting page, duplicates
  included (a duplicate costs one page of bandwidth and comes back as an
  "already present" page, which is counted as a race the kernel absorbed);
- the *request channel* places the urgent replies;
- migration is complete when the bytes the kernel reports as placed add up
  to the guest's size: the kernel never places a page twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from . import protocol as p
from .errors import LINK_ERRORS, PeerError, RemoteProtocolError, UsageError, find
from .guest import Guest, GuestSpec, Workload, replay
from .metrics import Histogram, rss_mib
from .progress import Progress, placed_line
from .uffd import PAGE_SIZE, Placed, Userfaultfd
from .wire import BlockingFrames, FrameSocket, connect, run_blocking

log = logging.getLogger(__name__)

# Samples of the placed-pages curve kept for plots: bounded, one per interval.
TIMELINE_INTERVAL = 0.1
MAX_TIMELINE = 10_000


@dataclass
class DestinationConfig:
    host: str
    port: int
    run_after: float = 1.0
    verify: bool = False
    key: bytes = b""
    prefetch: int = 0  # neighbours requested after each faulting page
    reconnect_timeout: float = 30.0  # how long a lost source may take to come back
    watchdog: float = 2.0  # seconds a vCPU may wait for one page before it is reported


@dataclass
class Tally:
    """Plain counters of one placement path: the destination's only state about pages.

    Each path (bulk placer thread, urgent channel task) writes only its own
    tally, so no counter is ever shared between threads.
    """

    placed_pages: int = 0
    eexist: int = 0
    zero_pages: int = 0

    def add(self, placed: Placed, zero: bool) -> None:
        self.placed_pages += placed.pages
        self.eexist += placed.existed
        if zero:
            self.zero_pages += placed.pages


class Destination:
    """The destination side of one migration."""

    def __init__(self, cfg: DestinationConfig) -> None:
        self.cfg = cfg
        self.bulk = Tally()
        self.urgent = Tally()
        self.faults = 0
        self.requests = 0
        self.fault_service = Histogram()
        self.progress = Progress()
        self.timeline: list[tuple[float, int]] = []
        self._all_placed = trio.Event()
        self._total = 0
        self._session = b""
        self.bytes_bulk = 0
        self.bytes_urgent = 0
        self.recoveries: list[dict[str, float]] = []

    async def _open(self, channel: p.Channel, session: bytes) -> tuple[FrameSocket, p.Welcome]:
        """Connects and authenticates one channel of a session (``b""``: a new one)."""
        fs = FrameSocket(await connect(self.cfg.host, self.cfg.port),
                         p.Connection(p.Role.DESTINATION, guest_pages=self._total or None),
                         f"source {self.cfg.host}:{self.cfg.port}")
        challenge = await fs.expect(p.Challenge)
        nonce = p.new_nonce()
        await fs.send(p.Hello(channel, session, nonce,
                              p.prove(self.cfg.key, p.Role.DESTINATION, channel, challenge.nonce, nonce)))
        welcome = await fs.expect(p.Welcome)
        if not p.proof_ok(p.prove(self.cfg.key, p.Role.SOURCE, channel, challenge.nonce, nonce), welcome.proof):
            fs.close()
            raise RemoteProtocolError("authentication failed: the source does not know the key",
                                      hint="give both sides the same --key-file")
        return fs, welcome

    async def run(self) -> dict[str, object]:
        """Migrates the guest in, lets it run, and returns the metrics."""
        t_connect = time.monotonic()
        uffd = Userfaultfd()  # before connecting: a machine that cannot take the guest says so at once
        bulk, welcome = await self._open(p.Channel.BULK, b"")
        self._session = welcome.session
        info = await bulk.expect(p.GuestInfo)
        spec = GuestSpec(pages=info.pages, vcpus=info.vcpus, workload=Workload(info.workload), seed=info.seed,
                         zero_permille=info.zero_permille, rate=info.rate)
        self._total = spec.pages
        guest = Guest(spec, fill=False)
        uffd.register(guest.base, spec.size)
        urgent, _ = await self._open(p.Channel.URGENT, self._session)
        log.info("guest of %d pages (%d MiB), %d vCPUs, %s; waiting for switchover",
                 spec.pages, spec.size >> 20, spec.vcpus, spec.workload.name)

        guest.time_stalls(True)  # until every page is here, any access may stall
        guest.start(gated=True)  # threads ready ahead of time: resuming is one wake-up
        try:
            cpu = await bulk.expect(p.CpuState)
            guest.import_state(list(cpu.vcpus))
            guest.release()  # before any page has arrived: every first touch faults
            running_at = time.time_ns()
            t_switch = time.monotonic()
            downtime_ms = (running_at - cpu.stopped_at_ns) / 1e6
            log.info("vCPUs running again %.2f ms after the source stopped them", downtime_ms)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog, guest)
                bulk, urgent = await self._postcopy(guest, uffd, bulk, urgent, t_switch)
                nursery.cancel_scope.cancel()
        except BaseException:
            # Never close the uffd and let vCPUs go on: a missing page would read as
            # zeros.  Those asleep in a fault stay asleep until the process exits.
            guest.request_stop()
            raise
        placement_s = time.monotonic() - t_switch
        guest.time_stalls(False)  # every page is present: no access can stall any more
        self.progress.finish()
        placed, eexist = self.placed_pages, self.eexist
        log.info("all %d pages placed in %.2f s: %d faults, %d requests, %d races absorbed by the kernel",
                 placed, placement_s, self.faults, self.requests, eexist)
        await bulk.send(p.DestDone({"pages_placed": placed, "faults": self.faults, "eexist": eexist}))
        self._retire(bulk, urgent)

        await trio.sleep(self.cfg.run_after)
        await trio.to_thread.run_sync(guest.stop)
        uffd.close()  # safe only now: every page is present, none can read as zeros
        steps = guest.steps()
        stalls = guest.stalls()
        rss = rss_mib()  # before the replay, which maps a second guest for the proof
        verified: bool | None = None
        if self.cfg.verify:
            log.info("verifying: replaying %s steps without migration", steps)
            digest = await trio.to_thread.run_sync(guest.digest)
            want_digest, want_state = await trio.to_thread.run_sync(replay, spec, steps)
            verified = digest == want_digest and guest.export_state() == want_state
        guest.close()
        return {
            "pages_total": spec.pages, "pages_placed": placed, "verified": verified,
            "downtime_ms": round(downtime_ms, 3), "total_s": round(placement_s, 3),
            "connect_to_done_s": round(time.monotonic() - t_connect, 3),
            "bytes_bulk": self.bytes_bulk, "bytes_urgent": self.bytes_urgent,
            "stream_gbps": round(self.bytes_bulk / placement_s / 1e9, 3),
            "faults": self.faults, "requests": self.requests, "eexist": eexist,
            "eexist_bulk": self.bulk.eexist, "eexist_urgent": self.urgent.eexist,
            "zero_pages": self.bulk.zero_pages + self.urgent.zero_pages,
            "vcpu_stall_us": stalls.summary(), "fault_service_us": self.fault_service.summary(),
            "vcpu_steps": steps, "rss_mib": rss, "guest_mib": spec.size / 2**20,
            "workload": spec.workload.name, "vcpus": spec.vcpus, "recoveries": self.recoveries,
            "placed_timeline": self.timeline,
        }

    async def _postcopy(self, guest: Guest, uffd: Userfaultfd, bulk: FrameSocket, urgent: FrameSocket,
                        t_switch: float) -> tuple[FrameSocket, FrameSocket]:
        """Places pages until all are there, reconnecting when a link breaks; returns the live channels."""
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._placer, bulk, uffd, guest.base)
                    nursery.start_soon(self._fault_reader, uffd, urgent, guest.base, guest.spec.pages)
                    nursery.start_soon(self._request_channel, urgent, uffd, guest.base)
                    nursery.start_soon(self._watch_progress, guest.spec.pages, t_switch, guest)
                    await self._all_placed.wait()
                    nursery.cancel_scope.cancel()
                return bulk, urgent
            except BaseException as exc:
                failure = find(exc, LINK_ERRORS)
                if failure is None:
                    raise
            self._retire(bulk, urgent)
            self.progress.finish()
            log.warning("lost the source (%s) with %d of %d pages placed; reconnecting for up to %g s",
                        failure, self.placed_pages, self._total, self.cfg.reconnect_timeout)
            bulk, urgent = await self._reconnect(guest)

    async def _reconnect(self, guest: Guest) -> tuple[FrameSocket, FrameSocket]:
        """Reconnects both channels with backoff, then tells the source what the kernel still lacks."""
        t0 = time.monotonic()
        delay = 0.05
        while True:
            try:
                bulk, _ = await self._open(p.Channel.BULK, self._session)
                try:
                    urgent, _ = await self._open(p.Channel.URGENT, self._session)
                except BaseException:
                    bulk.close()
                    raise
                break
            except (UsageError, *LINK_ERRORS) as exc:
                if time.monotonic() - t0 + delay > self.cfg.reconnect_timeout:
                    pct = 100 * self.placed_pages / self._total
                    raise PeerError(
                        f"the source has been unreachable for {self.cfg.reconnect_timeout:g} s ({exc}); "
                        f"{self.placed_pages} of {self._total} pages ({pct:.1f}%) had arrived; the guest is "
                        "stopped here and its memory is incomplete",
                        hint="restart the migration; raise --reconnect-timeout to ride out longer outages") from None
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
        runs = guest.absent_runs()
        missing = sum(n for _, n in runs)
        for i in range(0, max(len(runs), 1), p.MAX_REQUEST_RUNS):
            await bulk.send(p.Resume(tuple(runs[i:i + p.MAX_REQUEST_RUNS]), more=i + p.MAX_REQUEST_RUNS < len(runs)))
        reconnect_s = time.monotonic() - t0
        self.recoveries.append({"reconnect_s": round(reconnect_s, 3), "pages_missing": missing})
        log.info("reconnected after %.2f s; the kernel lacks %d pages in %d runs, asked the source for them",
                 reconnect_s, missing, len(runs))
        return bulk, urgent

    def _retire(self, bulk: FrameSocket, urgent: FrameSocket) -> None:
        """Closes a pair of channels, keeping their byte counts."""
        self.bytes_bulk += bulk.bytes_in
        self.bytes_urgent += urgent.bytes_in
        bulk.close()
        urgent.close()

    async def _watchdog(self, guest: Guest) -> None:
        """Names any vCPU stuck in one access (a fault) for longer than the threshold."""
        limit = self.cfg.watchdog
        while True:
            await trio.sleep(limit)
            for index, seconds, page in guest.stuck(int(limit * 1e9)):
                log.warning("watchdog: vCPU %d has waited %.1f s for page %d (address %#x)", index, seconds, page,
                            guest.base + page * PAGE_SIZE)

    @property
    def placed_pages(self) -> int:
        return self.bulk.placed_pages + self.urgent.placed_pages

    @property
    def eexist(self) -> int:
        """Pages the kernel already had when asked to place them: races it absorbed."""
        return self.bulk.eexist + self.urgent.eexist

    @staticmethod
    def _place(uffd: Userfaultfd, base: int, event: p.Event, tally: Tally) -> None:
        """Places one run; pages the kernel already has are counted, not an error."""
        if isinstance(event, p.PageRun):
            tally.add(uffd.copy(base + event.start * PAGE_SIZE, event.payload, event.count * PAGE_SIZE), False)
        elif isinstance(event, p.ZeroRun):
            tally.add(uffd.zeropage(base + event.start * PAGE_SIZE, event.count * PAGE_SIZE), True)
        else:
            raise RemoteProtocolError(f"unexpected {type(event).__name__} while pages are arriving")

    def _check_done(self) -> None:
        if self.placed_pages == self._total:
            self._all_placed.set()

    async def _placer(self, bulk: FrameSocket, uffd: Userfaultfd, base: int) -> None:
        """Places the bulk stream from a worker thread, so the trio thread stays free for faults."""
        await run_blocking(self._place_stream, bulk.blocking(self.cfg.reconnect_timeout), uffd, base)
        self._check_done()

    def _place_stream(self, frames: BlockingFrames, uffd: Userfaultfd, base: int) -> None:
        """Worker thread: receive and place until the source says the stream is complete."""
        while not isinstance(event := frames.receive(), p.SourceDone):
            self._place(uffd, base, event, self.bulk)

    async def _request_channel(self, urgent: FrameSocket, uffd: Userfaultfd, base: int) -> None:
        while True:
            event = await urgent.receive()
            self._place(uffd, base, event, self.urgent)
            if getattr(event, "echo", 0):
                self.fault_service.add(time.perf_counter_ns() - event.echo)
            self._check_done()

    async def _fault_reader(self, uffd: Userfaultfd, urgent: FrameSocket, base: int, pages: int) -> None:
        """Turns every fault into a request, at once; no dedup, no record of what was asked."""
        span = 1 + self.cfg.prefetch
        while True:
            await trio.lowlevel.wait_readable(uffd.fd)
            faults = uffd.read_faults()
            if not faults:
                continue
            runs = []
            for addr, _tid in faults:
                page = (addr - base) // PAGE_SIZE
                runs.append((page, min(span, pages - page)))
            self.faults += len(faults)
            self.requests += 1
            await urgent.send(p.PageRequest(tuple(runs), time.perf_counter_ns()))

    async def _watch_progress(self, pages: int, t0: float, guest: Guest) -> None:
        while True:
            elapsed, placed = time.monotonic() - t0, self.placed_pages
            if len(self.timeline) < MAX_TIMELINE:
                self.timeline.append((round(elapsed, 3), placed))
            # Built only when drawn (a terminal), and once more by finish() for the final figures.
            self.progress.update(lambda: placed_line(
                self.placed_pages, pages, self.placed_pages * PAGE_SIZE / max(time.monotonic() - t0, 1e-9) / 1e6,
                self.faults / max(time.monotonic() - t0, 1e-9), guest.stalls().percentile_us(0.5), self.eexist))
            await trio.sleep(TIMELINE_INTERVAL)
