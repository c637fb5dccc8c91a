"""migrate-dst: resumes the guest at once and fills its memory behind it.

The kernel is the only bookkeeper.  Since ``userfaultfd_must_wait()``
re-checks the page tables after a faulting thread has queued itself, a fault
that races with a ``UFFDIO_COPY`` of the same page is never lost; so this side
keeps no per-page state at all.  One nursery per session runs three native
loops (native/dataplane.c), each owned by a trio task:

- the *placer* places whatever the bulk stream brings;
- the *fault reader* asks the source for every faulting page, duplicates
  included (a duplicate costs one page of bandwidth and comes back as an
  "already present" page, which is counted as a race the kernel absorbed);
- the *request channel* places the replies to those requests;
- migration is complete when the pages present add up to the guest's size
  (the loops signal an eventfd): at switchover, after the last discard, the
  kernel says how many pages are present, and from then on the loops count
  what they place (the kernel never places a page twice).

In hybrid and precopy modes the placer first runs alone, before switchover,
while the guest still runs on the source: it places each round, replaces
(discards, then places) the runs a later round sends again, acknowledges
each round, and at a hybrid switchover discards the runs the source names,
before the vCPUs start.  Still no record of which page is where: the source
names the runs, and the kernel's page tables say what is present.  In
precopy the vCPUs start only once every page is present, and nothing faults.

A lost link is not the end: the guest waits in its faults while this side
reconnects, asks the kernel which pages are still absent, and sends the
source that list (and whether the vCPUs already run here).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import trio

from . import protocol as p
from ._native import ffi, lib
from .errors import (LINK_ERRORS, MigrateError, PeerError, PeerGone, ProtocolViolation, RemoteProtocolError, UsageError,
                     lost_link)
from .guest import Guest, GuestSpec, Workload, replay
from .loops import CONTROL, run_native
from .metrics import Histogram, rss_mib
from .progress import Progress, placed_line
from .stats import DestinationStats, Hops, Recovery
from .uffd import PAGE_SIZE, Userfaultfd
from .wire import FrameSocket, TlsConfig, connect, format_address, mark_urgent

log = logging.getLogger(__name__)

# Samples of the placed-pages curves kept for plots: bounded, one per interval.
TIMELINE_INTERVAL = 0.1
MAX_TIMELINE = 10_000
# Pauses between connection attempts: quick at first (a source that is just
# starting), then no more than once a second (a source busy with a flood).
FIRST_RETRY = 0.05
MAX_RETRY = 1.0


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
    link_timeout: float = 10.0  # silence while pages are owed before a link counts as lost
    connect_timeout: float = 10.0  # how long connecting may keep being refused or dropped
    tls: TlsConfig | None = None  # mutual TLS 1.3 on every connection
    switchover_timeout: float = 300.0  # how long the source may run its guest before migrating it


@dataclass
class _Links:
    """One session's three connections."""

    bulk: FrameSocket
    requests: FrameSocket
    replies: FrameSocket

    def close(self) -> None:
        for fs in (self.bulk, self.requests, self.replies):
            fs.close()


class Destination:
    """The destination side of one migration."""

    def __init__(self, cfg: DestinationConfig) -> None:
        self.cfg = cfg
        # The native loops' shared view of the guest and their counters, each
        # counter written by one loop only.
        self.plane = ffi.new("dst_plane_t *")
        self.progress = Progress()
        self.timeline: list[tuple[float, int, int]] = []
        self._session = b""
        self.info: p.GuestInfo | None = None  # from the first bulk connection: later ones are told it
        self.recoveries: list[Recovery] = []
        self.connect_attempts = 0  # every try of every channel: more than 2 when the source was busy
        self.mode = p.Mode.postcopy
        self.started = False  # the CPU state arrived and the vCPUs run: the switchover is done
        self.rounds_received = 0
        self.missing_at_switchover = 0
        self.discarded_at_switchover = 0
        self._switchover_deadline = math.inf  # trio's clock: the source must begin migrating by then

    @property
    def placed_pages(self) -> int:
        """Pages present, by the counters: what the kernel held at switchover, plus placements since.

        Before switchover: every placement (a replaced page counts each time).
        """
        d = self.plane
        return d.present_base + d.bulk.pages + d.urgent.pages - d.placed_base

    @property
    def eexist(self) -> int:
        """Pages the kernel already had when asked to place them: races it absorbed."""
        return self.plane.bulk.eexist + self.plane.urgent.eexist

    @property
    def _idle_ms(self) -> int:
        return max(1, round(self.cfg.link_timeout * 1000))

    async def _open(self, channel: p.Channel, session: bytes, deadline: float) -> FrameSocket:
        """Connects and authenticates one connection of a session (``b""``: a new one).

        A connection refused, reset or closed before the source's Welcome is
        tried again with backoff until ``deadline`` (trio's clock): a source
        that is still starting, or busy with other handshakes (it closes
        newcomers beyond ``--max-pending`` at once), lets us in a moment
        later.  An answer (an Error frame, a wrong proof) is final.

        Raises:
            PeerError: no Welcome by the deadline, or the source said no.
            RemoteProtocolError: the source is not a uffd-migrate source, or lacks the key.
        """
        where = format_address(self.cfg.host, self.cfg.port)
        t0, delay, attempts = trio.current_time(), FIRST_RETRY, 0
        while True:
            attempts += 1
            self.connect_attempts += 1
            try:
                with trio.fail_at(deadline):
                    return await self._open_once(channel, session)
            except trio.TooSlowError:
                raise PeerError(f"the source at {where} did not complete the handshake in "
                                f"{trio.current_time() - t0:.3g} s ({attempts} attempts)",
                                hint="is it busy with other connections? see its log; raise --connect-timeout") from None
            except PeerGone as exc:
                left = deadline - trio.current_time()
                if left < FIRST_RETRY:
                    raise PeerGone(f"{exc} (gave up after {attempts} attempts in {trio.current_time() - t0:.3g} s)",
                                   hint=exc.hint or "is the source busy with other connections? see its log; "
                                                    "raise --connect-timeout") from None
                if attempts == 1:
                    log.info("%s; trying again for up to %.3g s", exc, left)
                # Halving what is left near the deadline makes the last attempt start just before it.
                await trio.sleep(min(delay, left / 2))
                delay = min(2 * delay, MAX_RETRY)

    async def _open_once(self, channel: p.Channel, session: bytes) -> FrameSocket:
        """One attempt of ``_open``; closes its socket on any failure, cancellation included."""
        where = format_address(self.cfg.host, self.cfg.port)
        fs = FrameSocket(await connect(self.cfg.host, self.cfg.port, self.cfg.link_timeout),
                         p.Connection(p.Role.DESTINATION, self.info), f"source {where}", frame_timeout=self.cfg.link_timeout)
        try:
            if channel is not p.Channel.BULK:
                mark_urgent(fs.sock)
            if self.cfg.tls is not None:
                await fs.start_tls(self.cfg.tls, self.cfg.host)
            await fs.send_preamble()
            challenge = await fs.expect(p.Challenge)
            hello = p.hello(self.cfg.key, channel, session, challenge)
            await fs.send(hello)
            welcome = await fs.expect(p.Welcome)
            p.check_welcome(self.cfg.key, challenge, hello, welcome)
        except BaseException:
            fs.close()
            raise
        self._session = welcome.session
        return fs

    async def _open_links(self, bulk: FrameSocket, deadline: float) -> _Links:
        """The requests and replies connections that join ``bulk``'s session."""
        try:
            requests = await self._open(p.Channel.REQUESTS, self._session, deadline)
            try:
                return _Links(bulk, requests, await self._open(p.Channel.REPLIES, self._session, deadline))
            except BaseException:
                requests.close()
                raise
        except BaseException:
            bulk.close()
            raise

    async def run(self) -> DestinationStats:
        """Migrates the guest in, lets it run, and returns its statistics.

        **Cancellation**: stops the native loops through their eventfds and
        waits for them, and asks the vCPUs to stop; a vCPU asleep in a fault
        stays asleep, as the userfaultfd is never closed while a page may be
        missing (it would read as zeros).  The process is expected to exit.
        """
        t_connect = time.monotonic()
        uffd = Userfaultfd()  # before connecting: a machine that cannot take the guest says so at once
        deadline = trio.current_time() + self.cfg.connect_timeout
        bulk = await self._open(p.Channel.BULK, b"", deadline)
        self._switchover_deadline = trio.current_time() + self.cfg.switchover_timeout
        try:
            self.info = info = await bulk.expect(p.GuestInfo, within=self.cfg.link_timeout)  # follows the Welcome
        except BaseException:
            bulk.close()
            raise
        spec = GuestSpec(pages=info.pages, vcpus=info.vcpus, workload=Workload(info.workload), seed=info.seed,
                         zero_permille=info.zero_permille, rate=info.rate)
        self.mode = info.mode
        guest = Guest(spec, fill=False)
        uffd.register(guest.base, spec.size)
        d = self.plane
        d.uffd, d.base, d.pages = uffd.fd, guest.base, spec.pages
        done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        d.done_fd = done_fd
        links = await self._open_links(bulk, deadline)
        log.info("guest of %d pages (%d MiB), %d vCPUs, %s; %s migration; waiting for %s",
                 spec.pages, spec.size >> 20, spec.vcpus, spec.workload.name, self.mode.name,
                 "switchover" if self.mode is p.Mode.postcopy else "the precopy rounds")

        # Until every page is here, any access may stall; in precopy none can.
        guest.time_stalls(self.mode is not p.Mode.precopy)
        guest.start(gated=True)  # threads ready ahead of time: resuming is one wake-up
        try:
            cpu, links = await self._until_switchover(guest, links)
            received_ns = time.monotonic_ns()
            try:  # signals from the rounds (every page was present then) say nothing about now
                os.eventfd_read(done_fd)
            except BlockingIOError:
                pass
            guest.import_state(list(cpu.vcpus))
            guest.release()  # in postcopy before any page has arrived: every first touch faults
            here_ms = (time.monotonic_ns() - received_ns) / 1e6
            t_switch = time.monotonic()
            self.started = True
            # Completion from here on: what the kernel holds now (after every discard), plus what the
            # loops place (they never discard after switchover, and the kernel never places a page
            # twice).  Asked after the release, outside the downtime (one walk, ~2 ms per GiB): until
            # the loops start a vCPU can only wait in a fault, and nothing places or drops a page.
            d.present_base = guest.present_pages()
            d.placed_base = d.bulk.pages + d.urgent.pages
            self.missing_at_switchover = spec.pages - d.present_base
            if self.mode is p.Mode.precopy and self.missing_at_switchover:
                # Never seen: the source sends every page before the CPU state, and the placer has
                # placed every frame before it. Should it happen, the postcopy path fetches the
                # pages on demand (never a page read as zeros), and the metrics show the faults.
                log.error("precopy switchover with %d pages missing; fetching them on demand",
                          self.missing_at_switchover)
            # Each host's part on its own clock, and the crossing as half the kernel's smoothed round
            # trip: no two clocks compared, so an offset between the hosts' clocks cannot enter it.
            there_ms, wire_ms = cpu.stopped_ns_ago / 1e6, lib.link_rtt_us(links.bulk.sock.fileno()) / 2e3
            downtime_ms = there_ms + wire_ms + here_ms
            log.info("vCPUs running again %.2f ms after the source stopped them (%.2f ms there, %.2f ms on the "
                     "wire, %.2f ms here); %d of %d pages present", downtime_ms, there_ms, wire_ms, here_ms,
                     self.placed_pages, spec.pages)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog, guest)
                links = await self._postcopy(guest, links, done_fd, t_switch)
                nursery.cancel_scope.cancel()
        except BaseException:
            # Never close the uffd and let vCPUs go on: a missing page would read as
            # zeros.  Those asleep in a fault stay asleep until the process exits.
            guest.request_stop()
            raise
        placement_s = time.monotonic() - t_switch
        steps_placed = guest.live_steps_each()  # where the vCPUs were as the last page arrived
        guest.time_stalls(False)  # every page is present: no access can stall any more
        self.progress.finish()
        placed, eexist, faults = self.placed_pages, self.eexist, d.faults
        log.info("all %d pages placed in %.2f s: %d faults, %d requests, %d races absorbed by the kernel",
                 placed, placement_s, faults.faults, faults.requests, eexist)
        await self._close(links, {"pages_placed": placed, "faults": faults.faults, "eexist": eexist})
        os.close(done_fd)

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
        bulk_s, urgent_s = d.bulk, d.urgent
        return DestinationStats(
            mode=self.mode.name, precopy_rounds=self.rounds_received,
            pages_missing_at_switchover=self.missing_at_switchover,
            pages_replaced=bulk_s.replaced, pages_discarded=bulk_s.discarded,
            pages_discarded_at_switchover=self.discarded_at_switchover,
            placements=bulk_s.pages + urgent_s.pages,
            bytes_total=bulk_s.bytes + urgent_s.bytes + faults.bytes,
            pages_total=spec.pages, pages_placed=placed, verified=verified,
            downtime_ms=round(downtime_ms, 3), total_s=round(placement_s, 3),
            connect_to_done_s=round(time.monotonic() - t_connect, 3),
            bytes_bulk=bulk_s.bytes, bytes_urgent=urgent_s.bytes, bytes_requests=faults.bytes,
            stream_gbps=round(bulk_s.bytes / max(placement_s, 1e-3) / 1e9, 3),
            faults=faults.faults, requests=faults.requests, pages_requested=faults.pages_requested,
            eexist=eexist, eexist_bulk=bulk_s.eexist, eexist_urgent=urgent_s.eexist,
            pages_placed_bulk=bulk_s.pages, pages_placed_urgent=urgent_s.pages,
            zero_pages=bulk_s.zero_pages + urgent_s.zero_pages,
            vcpu_stall_us=stalls.summary(), fault_service_us=Histogram.from_c(urgent_s.service).summary(),
            hops_us=Hops(fault_to_request=Histogram.from_c(faults.to_send).summary(),
                         network=Histogram.from_c(urgent_s.network).summary(),
                         source_held=Histogram.from_c(urgent_s.held).summary(),
                         reply_to_placed=Histogram.from_c(urgent_s.place).summary()),
            vcpu_steps=tuple(steps), vcpu_steps_at_placed=tuple(steps_placed), rss_mib=rss,
            guest_mib=spec.size / 2**20, workload=spec.workload.name, vcpus=spec.vcpus,
            recoveries=tuple(self.recoveries), connect_attempts=self.connect_attempts,
            tls=self.cfg.tls.negotiated if self.cfg.tls else "plaintext",
            tls_rekeys=self.cfg.tls.rekeys if self.cfg.tls else 0,
            placed_timeline=tuple(self.timeline),
        )

    async def _until_switchover(self, guest: Guest, links: _Links) -> tuple[p.CpuState, _Links]:
        """Before switchover: places the precopy rounds (if any) until the CPU state arrives.

        Returns the CPU state and the live links.  A lost link reconnects with
        ``Resume(started=False)``: the source then sends the round under way
        again, or the whole switchover.

        **Cancellation**: stops the placer through its eventfd and waits for it.
        """
        deadline: float | None = None
        while True:
            placed_before = self.placed_pages
            try:
                return await self._receive_rounds(links), links
            except trio.TooSlowError:
                failure: object = "the link went silent between rounds"
            except Exception as exc:  # as in postcopy: only a lost link is recovered from
                if (failure := lost_link(exc)) is None:
                    raise
            links, deadline = await self._recover(guest, links, failure, placed_before, deadline,
                                                  "before switchover ")

    async def _recover(self, guest: Guest, links: _Links, failure: object, placed_before: int,
                       deadline: float | None, when: str) -> tuple[_Links, float]:
        """Closes the lost links and reconnects.  One deadline per outage: it restarts only once pages
        arrived since the last loss, so a link that keeps failing at once cannot loop for ever."""
        links.close()
        self.progress.finish()
        if deadline is None or self.placed_pages > placed_before:
            deadline = trio.current_time() + self.cfg.reconnect_timeout
        log.warning("lost the source %s(%s) with %d of %d pages here; reconnecting for up to %g s", when,
                    failure, self.placed_pages, self.plane.pages, self.cfg.reconnect_timeout)
        return await self._reconnect(guest, deadline), deadline

    async def _receive_rounds(self, links: _Links) -> p.CpuState:
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
            discarded_before = self.plane.bulk.discarded
            self.progress.update(f"round {event.number}: {event.pages} pages"
                                 + (" (switchover)" if event.final else ""))
            await self._run_placer(bulk)  # until the next control frame: RoundEnd, or the CpuState after the final
            if event.final:
                self.discarded_at_switchover = self.plane.bulk.discarded - discarded_before
            event = await bulk.receive()
            if isinstance(event, p.RoundEnd):
                await bulk.send(p.RoundAck(event.number))
                with trio.fail_after(self.cfg.link_timeout):
                    event = await bulk.receive()

    async def _postcopy(self, guest: Guest, links: _Links, done_fd: int, t_switch: float) -> _Links:
        """Places pages until all are there, reconnecting when a link breaks; returns the live links.

        **Cancellation**: stops the native loops (each through its eventfd) and
        waits for them; the guest's vCPUs stay where they are.
        """
        deadline: float | None = None  # of the recovery under way: progress resets it
        while True:
            if self.placed_pages >= self.plane.pages:
                return links  # precopy, or nothing was written after the last round
            placed_before = self.placed_pages
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._placer, links.bulk)
                    nursery.start_soon(self._fault_reader, links.requests)
                    nursery.start_soon(self._request_channel, links.replies)
                    nursery.start_soon(self._watch_progress, t_switch, guest)
                    await trio.lowlevel.wait_readable(done_fd)
                    nursery.cancel_scope.cancel()
                return links
            except Exception as exc:
                failure = lost_link(exc)
                if failure is None:
                    raise  # a bug, a local failure or a protocol violation: never taken for a lost link
                if self.placed_pages == self.plane.pages:
                    return links  # a link broke as the last page arrived: nothing is missing
            links, deadline = await self._recover(guest, links, failure, placed_before, deadline, "")

    async def _reconnect(self, guest: Guest, deadline: float) -> _Links:
        """Reconnects with backoff until ``deadline``, then tells the source what the kernel still lacks."""
        t0 = trio.current_time()
        delay, reason = FIRST_RETRY, "no attempt fitted"
        while True:
            if deadline - trio.current_time() < FIRST_RETRY:
                placed, total = self.placed_pages, self.plane.pages
                raise PeerError(
                    f"the source has been unreachable for {self.cfg.reconnect_timeout:g} s ({reason}); "
                    f"{placed} of {total} pages ({100 * placed / total:.1f}%) had arrived; the guest is "
                    "stopped here and its memory is incomplete",
                    hint="restart the migration; raise --reconnect-timeout to ride out longer outages")
            try:
                attempt = min(deadline, trio.current_time() + self.cfg.link_timeout)
                links = await self._open_links(await self._open(p.Channel.BULK, self._session, attempt), attempt)
                break
            except (UsageError, *LINK_ERRORS) as exc:
                if isinstance(exc, ProtocolViolation):
                    raise
                reason = str(exc)
                # The last attempt starts near the deadline, not a backoff step before it.
                await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))
                delay = min(delay * 2, MAX_RETRY)
        # The kernel's page tables, after every discard so far, are the whole record of what is missing.
        runs = guest.absent_runs()
        missing = sum(n for _, n in runs)
        for i in range(0, max(len(runs), 1), p.MAX_RESUME_RUNS):
            await links.bulk.send(p.Resume(tuple(runs[i:i + p.MAX_RESUME_RUNS]),
                                           more=i + p.MAX_RESUME_RUNS < len(runs), started=self.started))
        if self.started:
            await self._ask_again(guest, links.requests)
        reconnect_s = trio.current_time() - t0
        self.recoveries.append(Recovery(reconnect_s=round(reconnect_s, 3), pages_missing=missing))
        log.info("reconnected after %.2f s; the kernel lacks %d pages in %d runs, asked the source for them",
                 reconnect_s, missing, len(runs))
        return links

    async def _ask_again(self, guest: Guest, requests: FrameSocket) -> None:
        """Asks at once for the pages vCPUs are blocked on: their faults were read before the link broke.

        What a vCPU waits for is its own state (per vCPU, not per page), so
        this needs no record of what was asked before.
        """
        d = self.plane
        # Requests of the lost links will never be answered: owe only what is asked from now on.
        d.urgent.owed_base = max(0, d.faults.pages_requested - d.urgent.answered)
        pages = sorted({page for _, _, page in guest.stuck(0)})
        if not pages:
            return
        for i in range(0, len(pages), p.MAX_REQUEST_RUNS):
            batch = pages[i:i + p.MAX_REQUEST_RUNS]
            d.faults.pages_requested += len(batch)  # no loop runs now: this task may write it
            await requests.send(p.PageRequest(tuple((page, 1) for page in batch), lib.mono_ns()))
        log.info("asked again for the %d pages vCPUs are waiting on", len(pages))

    async def _close(self, links: _Links, counters: dict[str, float]) -> None:
        """Tells the source every page is here, then waits for it to close first.

        DestDone goes after the last request, on the requests connection, whose
        only reader at the source is the request server.  The source closes its
        connections once it has read DestDone; closing ours only after that
        means our close can never look like a lost link to it.  Bounded by
        ``link_timeout``.
        """
        try:
            await links.requests.send(p.DestDone(counters))
            with trio.move_on_after(self.cfg.link_timeout):
                while True:  # stream frames still in flight are duplicates: skip them
                    await links.bulk.receive()
        except (PeerError, RemoteProtocolError):
            pass  # closed, as expected
        links.close()

    async def _run_placer(self, fs: FrameSocket, replies: bool = False) -> int:
        """Runs the native placer on ``fs`` for the frames its protocol state allows; returns how it ended.

        **Cancellation**: stops the placer through its eventfd and waits for it.
        """
        return await run_native(lib.dst_place_loop, self.plane, int(replies), fs.conn.accepts, fs.link, fs.conn.rx,
                                self._idle_ms, peer=fs.peer)

    async def _placer(self, bulk: FrameSocket) -> None:
        """Runs the native placer on the bulk stream until the source says it is complete (SourceDone).

        **Cancellation**: stops the placer through its eventfd and waits for it.
        """
        if await self._run_placer(bulk) == CONTROL:
            await bulk.expect(p.SourceDone)  # the only control frame the stream allows; an Error raises

    async def _fault_reader(self, requests: FrameSocket) -> None:
        """Runs the native fault reader: every batch of faults becomes one request, at once.

        **Cancellation**: stops it through its eventfd and waits for it.
        """
        await run_native(lib.dst_fault_loop, self.plane, requests.link, self._idle_ms, 1 + self.cfg.prefetch,
                         peer=requests.peer)

    async def _request_channel(self, replies: FrameSocket) -> None:
        """Runs the native reply placer on the replies connection.

        **Cancellation**: stops it through its eventfd and waits for it.
        """
        if await self._run_placer(replies, replies=True) == CONTROL:
            await replies.receive()  # the replies allow no control frame: an Error, or a protocol error, raises

    async def _watchdog(self, guest: Guest) -> None:
        """Names any vCPU stuck in one access (a fault) for longer than the threshold."""
        limit = self.cfg.watchdog
        while True:
            await trio.sleep(limit)
            for index, seconds, page in guest.stuck(int(limit * 1e9)):
                log.warning("watchdog: vCPU %d has waited %.1f s for page %d (address %#x)", index, seconds, page,
                            guest.base + page * PAGE_SIZE)

    async def _watch_progress(self, t0: float, guest: Guest) -> None:
        d = self.plane
        while True:
            elapsed = time.monotonic() - t0
            if len(self.timeline) < MAX_TIMELINE:
                self.timeline.append((round(elapsed, 3), d.bulk.pages, d.urgent.pages))
            # Built only when drawn (a terminal), and once more by finish() for the final figures.
            self.progress.update(lambda: placed_line(
                self.placed_pages, d.pages, self.placed_pages * PAGE_SIZE / max(time.monotonic() - t0, 1e-9) / 1e6,
                d.faults.faults / max(time.monotonic() - t0, 1e-9), guest.stalls().percentile_us(0.5), self.eexist))
            await trio.sleep(TIMELINE_INTERVAL)
