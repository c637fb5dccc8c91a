"""The kernel's dirty tracking (source) and discards (destination): no userland bitmap anywhere.

One process, real page tables: the source registers a region for
asynchronous write-protection and asks PAGEMAP_SCAN what was written; the
destination's placer replaces and discards runs it is told to.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

import pytest
import trio
from hypothesis import given, settings, strategies as st

from helpers import Side, deliver, hostile
from migrate import protocol as p
from migrate._native import ffi, lib
from migrate.dirty import DirtyTracker, Runs
from migrate.errors import RemoteProtocolError
from migrate.guest import Guest, GuestSpec
from migrate.uffd import PAGE_SIZE, Userfaultfd

PAGES = 1024


def write(guest: Guest, first: int, count: int, seed: int = 7) -> None:
    """Writes pages from C (guest memory is never touched from Python)."""
    lib.guest_fill(guest.base, first, count, seed, 0)


@contextmanager
def tracked(spec: GuestSpec, fill: bool) -> Iterator[tuple[Guest, DirtyTracker]]:
    """A guest of PAGES pages and a DirtyTracker over it; both closed at the end."""
    guest = Guest(spec, fill=fill)
    tracker = DirtyTracker(guest.base, PAGES)
    try:
        yield guest, tracker
    finally:
        tracker.close()
        guest.close()


def test_a_scan_returns_exactly_what_was_written_and_protects_it_again() -> None:
    with tracked(GuestSpec(pages=PAGES, vcpus=1, zero_permille=500), fill=True) as (guest, tracker):
        assert tracker.take().pages == 0
        write(guest, 5, 2)
        write(guest, 100, 11)
        write(guest, PAGES - 1, 1)
        got = tracker.take()
        assert got.as_list() == [(5, 2), (100, 11), (PAGES - 1, 1)] and got.pages == 14
        assert tracker.take().pages == 0  # protected again
        write(guest, 6, 1)
        assert tracker.take().as_list() == [(6, 1)]


def test_pages_never_touched_are_tracked_too() -> None:
    """WP_UNPOPULATED: a zero page the guest never touched is seen at its first write."""
    with tracked(GuestSpec(pages=PAGES, vcpus=1), fill=False) as (guest, tracker):  # nothing populated at all
        write(guest, 300, 4)
        assert tracker.take().as_list() == [(300, 4)]


def test_the_previous_result_survives_one_more_scan() -> None:
    with tracked(GuestSpec(pages=PAGES, vcpus=1), fill=True) as (guest, tracker):
        write(guest, 10, 3)
        a = tracker.take()
        write(guest, 11, 5)
        b = tracker.take()
        assert a.as_list() == [(10, 3)] and b.as_list() == [(11, 5)]
        assert tracker.union(a, b).as_list() == [(10, 6)]
        assert tracker.intersection(a, b).as_list() == [(11, 2)]


@pytest.mark.parametrize("max_runs", [7, 600], ids=["tiny", "more-than-one-scan"])
def test_a_run_array_too_small_loses_no_write(max_runs: int) -> None:
    """One PAGEMAP_SCAN call protects again every region it returns: one that does not fit the caller's
    array must never be returned, or its writes are lost for good.  A full array means "call again";
    the pages not taken stay marked written, and the calls together take exactly what was written."""
    pages = 4096
    guest = Guest(GuestSpec(pages=pages, vcpus=1), fill=True)
    tracker = DirtyTracker(guest.base, pages)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        written = set(range(0, pages, 3)) | set(range(1000, 1100)) | {pages - 1}  # about 1300 runs
        for start, count in _runs(written):
            write(guest, start, count)
        runs, total = ffi.new("struct wire_run[]", max_runs), ffi.new("uint64_t *")
        taken: set[int] = set()
        for _ in range(pages):
            n = lib.dirty_take(pagemap, guest.base, pages, 12, runs, max_runs, total)
            assert n >= 0, os.strerror(-n)
            got = {page for i in range(n) for page in range(runs[i].start, runs[i].start + runs[i].count)}
            assert len(got) == total[0] and not got & taken  # counts only what it took, and takes it once
            taken |= got
            if n < max_runs:
                break
        assert taken == written
        assert tracker.take().pages == 0  # and every page taken is protected again
    finally:
        os.close(pagemap)
        tracker.close()
        guest.close()


def _runs(pages: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for page in sorted(pages):
        if out and out[-1][0] + out[-1][1] == page:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((page, 1))
    return out


def _array(runs: list[tuple[int, int]]) -> Runs:
    return Runs(ffi.new("struct wire_run[]", [{"start": s, "count": n} for s, n in runs] or 1), len(runs),
                sum(n for _, n in runs))


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(0, 200)), st.sets(st.integers(0, 200)))
def test_union_and_intersection_of_scans_are_the_set_operations(a: set[int], b: set[int]) -> None:
    out, total = ffi.new("struct wire_run[]", 202), ffi.new("uint64_t *")
    ra, rb = _array(_runs(a)), _array(_runs(b))
    for fn, want in ((lib.runs_union, a | b), (lib.runs_intersect, a & b)):
        n = fn(ra.array, ra.n, rb.array, rb.n, out, total)
        assert Runs(out, n, total[0]).as_list() == _runs(want) and total[0] == len(want)


# -- the destination's placer: replace and discard, only before switchover ----------------------
@pytest.fixture
def dest():
    """A destination during precopy round 1, when discards and replacements may come."""
    d = Side(PAGES, p.State.ROUND)
    yield d
    d.close()


async def place(dest: Side, data: bytes, end: p.Event) -> int:
    """Feeds ``data``, then ``end`` (a control frame), through the native placer, which checks them
    against the destination's protocol state; returns how it ended."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with ours, theirs:
        theirs.sendall(data + b"".join(bytes(c) for c in dest.peer.send(end)))
        with trio.fail_after(10):
            rc = await dest.placer(ffi.new("link_t *", {"fd": ours.fileno()}), 10_000).run(peer="source")
        assert dest.conn.next_event() == end  # the hand-back leaves it for Python
        return rc


async def place_round(dest: Side, n: int, events: list[p.Event]) -> int:
    """Round ``n`` (round 1 is under way already): its frames, its end, its acknowledgement."""
    if n > 1:
        assert deliver(dest.peer, dest.conn, p.Round(n, 0)) == p.Round(n, 0)
    rc = await place(dest, b"".join(bytes(c) for e in events for c in dest.peer.send(e)), p.RoundEnd(n))
    deliver(dest.conn, dest.peer, p.RoundAck(n))
    return rc


async def test_a_replaced_run_takes_the_new_contents_and_a_discarded_one_is_absent(dest: Side) -> None:
    old, new = b"\x01" * (4 * PAGE_SIZE), b"\x02" * (4 * PAGE_SIZE)
    assert await place_round(dest, 1, [p.PageRun(0, 4, old), p.ZeroRun(4, 60)]) == lib.LOOP_CONTROL
    assert dest.guest.absent_runs() == [(64, PAGES - 64)]
    # Without the flag the present pages stay (-EEXIST); with it the run is replaced.
    assert await place_round(dest, 2, [p.PageRun(0, 4, new)]) == lib.LOOP_CONTROL
    assert dest.plane.bulk.eexist == 4
    assert await place_round(dest, 3, [p.PageRun(0, 4, new, replace=True), p.Discard(10, 5),
                                       p.ZeroRun(12, 1, replace=True)]) == lib.LOOP_CONTROL
    assert dest.guest.absent_runs() == [(10, 2), (13, 2), (64, PAGES - 64)]
    assert dest.plane.bulk.replaced == 5 and dest.plane.bulk.discarded == 5
    assert dest.guest.present_pages() == 64 - 4
    digest_new = lib.guest_digest(dest.guest.base, 4)  # pages 0..3 are present: reading them cannot fault
    ref = Guest(GuestSpec(pages=4, vcpus=1), fill=False)
    try:
        uffd = Userfaultfd()
        uffd.register(ref.base, ref.spec.size)
        uffd.copy(ref.base, new, len(new))
        assert lib.guest_digest(ref.base, 4) == digest_new
        uffd.close()
    finally:
        ref.close()


@pytest.mark.parametrize("event", [p.Discard(0, 1), p.PageRun(0, 1, b"x" * PAGE_SIZE, replace=True),
                                   p.ZeroRun(0, 1, replace=True)], ids=["discard", "replace", "replace-zero"])
async def test_after_switchover_a_discard_or_replacement_is_refused(event: p.Event) -> None:
    """Once vCPUs run, dropping a page could lose what one wrote: the protocol's state refuses it in the
    placer's own check, and nothing is touched."""
    dest = Side(PAGES)  # in the postcopy stream
    try:
        placed = b"".join(bytes(c) for c in dest.peer.send(p.ZeroRun(0, 1)))
        with pytest.raises(RemoteProtocolError, match="a vCPU may have written the pages"):
            await place(dest, placed + hostile(event), p.SourceDone(0))
        assert dest.guest.absent_runs() == [(1, PAGES - 1)]
    finally:
        dest.close()
