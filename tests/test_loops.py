"""The native loops under their trio owners: stops, peer closes, silence, bad frames, and a real transfer.

Real sockets (socketpairs) and a real userfaultfd; no processes.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import pytest
import trio

from helpers import Loop, Side, TlsPair, conversation, drip, request_server, sender
from migrate import protocol as p
from migrate._native import ffi, lib
from migrate.errors import PeerError, ProtocolViolation, RemoteProtocolError, lost_link
from migrate.guest import Guest, GuestSpec, Workload
from migrate.loops import run_native
from migrate.uffd import PAGE_SIZE

PAGES = 4096


@pytest.fixture
def side():
    s = Side(PAGES)
    yield s
    s.close()


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def link(sock: socket.socket) -> object:
    """A plaintext link_t on sock, as the loops take it."""
    return ffi.new("link_t *", {"fd": sock.fileno()})


async def test_a_cancelled_loop_stops_promptly_and_is_not_a_peer_error(side: Side) -> None:
    ours, theirs = pair()
    with ours, theirs:
        t0 = time.monotonic()
        with trio.move_on_after(0.3):
            await side.placer(link(ours), 60_000).run(peer="peer")
        assert time.monotonic() - t0 < 2  # the eventfd woke the thread; no exception escaped


async def test_a_peer_closing_is_a_peer_error(side: Side) -> None:
    ours, theirs = pair()
    with ours:
        theirs.close()
        with trio.fail_after(5), pytest.raises(PeerError, match="closed the connection"):
            await side.placer(link(ours), 60_000).run(peer="peer")


async def test_silence_while_the_stream_owes_pages_is_a_lost_link(side: Side) -> None:
    ours, theirs = pair()
    with ours, theirs:
        t0 = time.monotonic()
        with trio.fail_after(5), pytest.raises(PeerError, match="went silent"):
            await side.placer(link(ours), 200).run(peer="peer")
        assert time.monotonic() - t0 >= 0.2


async def test_silence_with_no_request_outstanding_is_normal(side: Side) -> None:
    ours, theirs = pair()
    with ours, theirs:
        with trio.move_on_after(1.0) as scope:  # five idle periods
            await side.placer(link(ours), 200, replies=True).run(peer="peer")
        assert scope.cancelled_caught
        side.plane.faults.pages_requested = 1  # now one page is owed and nothing comes
        with trio.fail_after(5), pytest.raises(PeerError, match="went silent"):
            await side.placer(link(ours), 200, replies=True).run(peer="peer")


async def test_a_bad_frame_is_a_protocol_error_and_places_nothing(side: Side) -> None:
    ours, theirs = pair()
    with ours, theirs:
        theirs.sendall(struct.pack("<IIQQII", lib.WIRE_PAGES, 1, PAGES, 0, 0, 0) + b"x" * 4096)
        with trio.fail_after(5), pytest.raises(RemoteProtocolError, match="outside the guest"):
            await side.placer(link(ours), 60_000).run(peer="peer")
    assert side.plane.bulk.pages == 0


@pytest.mark.parametrize("kind,flags", [(lib.WIRE_DISCARD, 0), (lib.WIRE_PAGES, lib.WIRE_REPLACE),
                                        (lib.WIRE_REQUEST, 0)])
async def test_a_frame_out_of_order_is_a_protocol_violation_never_a_lost_link(side: Side, kind: int,
                                                                              flags: int) -> None:
    """A discard or a replacement after switchover, or a request on the stream, is well formed but out of
    order: reconnecting would meet it again, so it ends the migration (docs/security.md) and places nothing."""
    ours, theirs = pair()
    with ours, theirs:
        payload = b"x" * 4096 if kind == lib.WIRE_PAGES else struct.pack("<QQ", 0, 1) if kind == lib.WIRE_REQUEST \
            else b""
        theirs.sendall(struct.pack("<IIQQII", kind, 1, 0, 0, 0, flags) + payload)
        with trio.fail_after(5), pytest.raises(ProtocolViolation, match="out of order") as caught:
            await side.placer(link(ours), 60_000).run(peer="peer")
        assert lost_link(caught.value) is None
    assert side.plane.bulk.pages == side.plane.bulk.discarded == 0


async def test_a_control_frame_hands_the_connection_back_to_python(side: Side) -> None:
    ours, theirs = pair()
    src = side.peer  # the source's end of the conversation, in the postcopy stream
    with ours, theirs:
        theirs.sendall(b"".join(bytes(c) for c in src.send(p.ZeroRun(0, 2)) + src.send(p.SourceDone(2))))
        with trio.fail_after(5):
            end = await side.placer(link(ours), 60_000).run(peer="peer")
        assert end == lib.LOOP_CONTROL
        assert side.conn.next_event() == p.SourceDone(2)  # read on from where the loop stopped
    assert side.plane.bulk.pages == side.plane.bulk.zero_pages == 2


async def stream_through(side: Side, src_guest: Guest, runs: list[tuple[int, int]]) -> object:
    """The source's sender and the destination's placer, back to back, until every page is placed;
    returns the sender's statistics."""
    stats = ffi.new("send_stats_t *")
    array = ffi.new("struct wire_run[]", [{"start": a, "count": n} for a, n in runs])
    ours, theirs = pair()
    theirs.setblocking(False)
    with ours, theirs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(side.placer(link(ours)).run, peer="source"))
            await sender(src_guest.base, PAGES, link(theirs), stats).run(array, len(runs), 0, peer="destination")
            await trio.lowlevel.wait_readable(side.done)
            nursery.cancel_scope.cancel()
    return stats


async def test_stream_from_guest_memory_arrives_whole(side: Side) -> None:
    """The source's sender and the destination's placer, back to back: every page placed once, same digest."""
    spec = GuestSpec(pages=PAGES, vcpus=1, workload=Workload.uniform, zero_permille=300)
    src_guest = Guest(spec, fill=True)
    try:
        stats = await stream_through(side, src_guest, [(0, 1000), (1000, PAGES - 1000)])
        assert side.plane.bulk.pages == PAGES and stats.pages == PAGES
        assert 0 < side.plane.bulk.zero_pages == stats.zero_pages < PAGES
        assert await trio.to_thread.run_sync(side.guest.digest) == await trio.to_thread.run_sync(src_guest.digest)
    finally:
        src_guest.close()


async def test_pages_go_to_their_region_wherever_it_is_mapped(side: Side) -> None:
    """A VMM's regions need not follow each other: here the guest's first 1000 pages live after the rest.
    Frames of 256 pages cross the boundary; each stretch lands in its region."""
    head = 1000
    base = side.guest.base
    side.plane.nregions = 2
    side.plane.region[0] = (base + (PAGES - head) * PAGE_SIZE, 0, head)
    side.plane.region[1] = (base, head, PAGES - head)
    spec = GuestSpec(pages=PAGES, vcpus=1, workload=Workload.uniform, zero_permille=300)
    src_guest = Guest(spec, fill=True)

    async def digest(at: int, pages: int) -> int:
        with trio.fail_after(10):  # a page placed in the wrong place leaves another missing: its read would hang
            return await trio.to_thread.run_sync(lib.guest_digest, at, pages, abandon_on_cancel=True)
    try:
        await stream_through(side, src_guest, [(0, PAGES)])
        assert side.plane.bulk.pages == PAGES and side.plane.bulk.eexist == 0
        assert await digest(base, PAGES - head) == await digest(src_guest.base + head * PAGE_SIZE, PAGES - head)
        assert await digest(base + (PAGES - head) * PAGE_SIZE, head) == await digest(src_guest.base, head)
    finally:
        src_guest.close()


@contextmanager
def flowing(sock: socket.socket, chunk: bytes | None, for_s: float = 3.0) -> Iterator[None]:
    """A peer whose data never pauses: a thread keeps ``sock`` full of ``chunk`` over and over (whole
    frames, in order), or with ``chunk=None`` reads everything that arrives, for ``for_s`` seconds at
    most (so that a loop that never notices its stop still ends, and its test fails rather than hangs)."""
    done = threading.Event()

    def run() -> None:
        sock.settimeout(0.05)
        deadline = time.monotonic() + for_s
        view, off, buf = memoryview(chunk or b""), 0, bytearray(1 << 20)
        while not done.is_set() and time.monotonic() < deadline:
            try:
                if chunk is None:
                    if not sock.recv_into(buf):
                        return
                else:
                    off = (off + sock.send(view[off:])) % len(view)
            except TimeoutError:
                continue
            except OSError:
                return  # the other end is gone

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


async def stopped_within(loop: Loop, after: float = 0.5, *, peer: str) -> float:
    """Runs a native loop, stops it ``after`` seconds, and returns how long it took to notice."""
    t0 = time.monotonic()
    with trio.move_on_after(after):
        await loop.run(peer=peer)
    return time.monotonic() - t0 - after


async def test_the_placer_notices_its_stop_while_frames_keep_coming(side: Side) -> None:
    """A source that keeps the socket readable (here: valid zero runs over pages already present, each
    a 256-page walk of -EEXIST) never makes the placer wait, where it used to look at its stop."""
    frame = b"".join(bytes(c) for c in side.peer.send(p.ZeroRun(0, lib.WIRE_MAX_RUN_PAGES)))
    ours, theirs = pair()
    with ours, theirs, flowing(theirs, frame * 2048):
        late = await stopped_within(side.placer(link(ours)), peer="source")
    assert side.plane.bulk.eexist > side.plane.bulk.pages  # it was walking present pages all along
    assert late < 0.5


async def test_the_request_server_notices_its_stop_while_requests_keep_coming() -> None:
    """A destination that keeps asking (and reads every reply at once) never makes the request server
    wait, where it used to look at its stop."""
    guest = Guest(GuestSpec(pages=PAGES, vcpus=1), fill=False)  # all zero: replies are small frames
    src, dst = conversation(p.State.REQUESTING, PAGES)
    # The largest request, 64 runs of 256 pages: the server scans 64 MiB for each.
    runs = tuple(((i * lib.WIRE_MAX_RUN_PAGES) % PAGES, lib.WIRE_MAX_RUN_PAGES) for i in range(p.MAX_REQUEST_RUNS))
    request = b"".join(bytes(c) for c in dst.send(p.PageRequest(runs, 1)))
    stats, notes = ffi.new("send_stats_t *"), ffi.new("note_ring_t *")
    (req, req_peer), (rep, rep_peer) = pair(), pair()
    try:
        with req, req_peer, rep, rep_peer, flowing(req_peer, request * 64), flowing(rep_peer, None):
            late = await stopped_within(request_server(guest.base, PAGES, link(req), src.rx, link(rep), stats, notes),
                                        peer="destination")
        assert stats.requests > 10
        assert late < 0.5
    finally:
        guest.close()


async def test_a_long_zero_run_travels_as_frames_of_at_most_256_pages(side: Side) -> None:
    """A zero run is bounded like a page run, so that one frame's work for the placer is bounded too."""
    src_guest = Guest(GuestSpec(pages=PAGES, vcpus=1), fill=False)  # all zero
    try:
        stats = await stream_through(side, src_guest, [(0, PAGES)])
        assert stats.frames == PAGES // lib.WIRE_MAX_RUN_PAGES == side.plane.bulk.frames
        assert side.plane.bulk.pages == side.plane.bulk.zero_pages == PAGES
    finally:
        src_guest.close()


async def test_replies_for_pages_never_asked_are_not_counted_as_answers() -> None:
    """The source chooses what it sends: answers beyond what was asked must neither silence the
    replies' timeout (pages stay owed) nor leave more answered than asked, which would make the next
    session's owed_base (pages_requested - answered) negative."""
    side = Side(PAGES, p.State.REPLYING)
    try:
        side.plane.faults.pages_requested = 10
        side.plane.urgent.owed_base = 4  # asked on a link since lost
        unasked = [p.ZeroRun(i * 256, 256, echo=1) for i in range(3)]
        ours, theirs = pair()
        with ours, theirs:
            theirs.sendall(b"".join(bytes(c) for e in unasked for c in side.peer.send(e)))
            theirs.close()
            with trio.fail_after(5), pytest.raises(PeerError, match="closed the connection"):
                await side.placer(link(ours), 60_000, replies=True).run(peer="source")
        u = side.plane.urgent
        assert u.pages == 3 * 256  # placed all the same: the kernel had none of them
        assert u.answered <= side.plane.faults.pages_requested - u.owed_base
    finally:
        side.close()


# -- a send stopped part-way: the link is cut, nobody may write on it again ---------------------
async def test_a_send_stopped_part_way_through_a_frame_leaves_the_link_cut() -> None:
    """The streamer stopped while the destination reads nothing: part of a frame is on the link, and
    whatever Python wrote next (DestDone, an Error) would be read as the rest of it."""
    guest = Guest(GuestSpec(pages=PAGES, vcpus=1, zero_permille=0), fill=True)  # 16 MiB: more than a socket holds
    runs = ffi.new("struct wire_run[]", [{"start": 0, "count": PAGES}])
    stats = ffi.new("send_stats_t *")
    ours, theirs = pair()
    try:
        with ours, theirs:
            l = link(ours)
            with trio.move_on_after(0.3):
                await sender(guest.base, PAGES, l, stats).run(runs, 1, 0, peer="destination")
            assert 0 < stats.bytes < PAGES * 4096
            assert l.cut == 1
    finally:
        guest.close()


async def test_a_send_that_finished_leaves_the_link_whole() -> None:
    guest = Guest(GuestSpec(pages=16, vcpus=1), fill=True)
    runs = ffi.new("struct wire_run[]", [{"start": 0, "count": 16}])
    ours, theirs = pair()
    try:
        with ours, theirs, trio.fail_after(5):
            l = link(ours)
            await sender(guest.base, 16, l, ffi.new("send_stats_t *")).run(runs, 1, 0, peer="destination")
            assert l.cut == 0
    finally:
        guest.close()


def fill(sock: socket.socket) -> None:
    """Writes to a non-blocking socket nobody reads until it takes not one more byte."""
    for size in (1 << 16, 1 << 10, 1):
        try:
            while True:
                sock.send(b"\0" * size)
        except BlockingIOError:
            pass


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_a_request_stopped_before_its_first_byte_cuts_only_a_tls_link(tls: bool, tmp_path) -> None:
    """The fault reader stopped while its request waits for a full socket: in plaintext nothing of the
    frame left (the link is whole); with TLS, OpenSSL holds the record, which only the same write may
    finish (the link is cut)."""
    side = Side(16)
    t = TlsPair(tmp_path) if tls else None
    ours, theirs = (t.ours, t.theirs) if t else pair()
    l = t.link if t else link(ours)
    try:
        fill(ours)
        async with trio.open_nursery() as nursery:
            # A vCPU's access to page 0: a fault, so a request to send.
            nursery.start_soon(trio.to_thread.run_sync, lib.guest_digest, side.guest.base, 1)
            try:
                with trio.move_on_after(0.3):
                    await run_native(lib.dst_fault_loop, side.plane, l, 60_000, 1, peer="source")
            finally:
                side.uffd.zeropage(side.guest.base, 4096)  # lets the access finish
        assert side.plane.faults.pages_requested == 1  # the request was built, and stopped in send_all
        assert l.cut == int(tls)
    finally:
        if t:
            t.close()
        else:
            ours.close()
            theirs.close()
        side.close()


async def test_a_frame_dripped_a_byte_at_a_time_is_a_lost_link_within_the_link_timeout(side: Side) -> None:
    """A peer that sends a byte every 50 ms is never silent: the frame it began must still end within the
    link's timeout (it once held the placer for as long as the drip went on)."""
    ours, theirs = pair()
    with ours, theirs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip, theirs, struct.pack("<IIQQII", lib.WIRE_ZEROS, 1, 0, 0, 0, 0), 0.05)
            t0 = time.monotonic()
            with trio.fail_after(5), pytest.raises(PeerError, match="did not end within the link timeout"):
                await side.placer(link(ours), 300).run(peer="peer")
            assert time.monotonic() - t0 < 1.2  # the timeout, a poll period, a margin; the drip takes 1.6 s
            nursery.cancel_scope.cancel()
    assert side.plane.bulk.pages == 0
