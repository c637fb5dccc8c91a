"""The sans-io protocol: bytes in, events out; every bound holds against hostile input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from conftest import past_handshake
from migrate import protocol as p
from migrate.errors import LocalProtocolError, RemoteProtocolError

PAGE = p.PAGE_SIZE


def opened(role: p.Role, guest_pages: int | None = None) -> p.Connection:
    """A connection past its handshake, that has sent its preamble too: what every frame after it meets."""
    conn = past_handshake(p.Connection(role, guest_pages=guest_pages))
    conn.preamble()
    return conn


def pair(pages: int | None = 100) -> tuple[p.Connection, p.Connection]:
    return opened(p.Role.SOURCE, pages), opened(p.Role.DESTINATION, pages)


def wire(conn: p.Connection, event: p.Event) -> bytes:
    return b"".join(bytes(c) for c in conn.send(event))


def deliver(sender: p.Connection, receiver: p.Connection, event: p.Event) -> p.Event:
    receiver.receive_data(wire(sender, event))
    return receiver.next_event()


PREAMBLE = struct.pack(">4sH", p.MAGIC, p.VERSION)
# struct wire_frame, for hand-made hostile frames (native/wire.h): kind, count, start, stamp, held_ns, flags.
HEADER = struct.Struct("<IIQQII")
PAGES, ZEROS, REQUEST, CONTROL, DISCARD = 1, 2, 3, 4, 5
REPLACE = 1


def test_hand_made_header_matches_the_c_struct() -> None:
    assert HEADER.size == p.FRAME_SIZE
    assert HEADER.pack(PAGES, 2, 3, 4, 5, 0) == p._frame(p.lib.WIRE_PAGES, 2, 3, 4, 5)


def raw(kind: int, count: int, start: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    return PREAMBLE + HEADER.pack(kind, count, start, 0, 0, flags) + payload


def frame(body: object, preamble: bool = True) -> bytes:
    """A control frame with a msgpack body."""
    b = msgpack.packb(body)
    return (PREAMBLE if preamble else b"") + HEADER.pack(CONTROL, len(b), 0, 0, 0, 0) + b


SOURCE_EVENTS = [
    p.GuestInfo(pages=100, vcpus=2, workload=1, seed=2**64 - 1, zero_permille=250, rate=0),
    p.GuestInfo(pages=100, vcpus=2, workload=1, seed=2, zero_permille=250, rate=0, mode=p.Mode.precopy),
    p.Round(3, 1234, final=True),
    p.RoundEnd(2),
    p.ZeroRun(5, 7, replace=True),
    p.Discard(40, 60),
    p.CpuState(((1, 2, 3), (2**64 - 1, 0, 5)), 1_700_000_000_000_000_000),
    p.PageRun(3, 2, b"\xab" * (2 * PAGE), echo=2**62),
    p.ZeroRun(99, 1, echo=7, held_ns=9),
    p.SourceDone(100),
    p.Error("gone"),
]
DEST_EVENTS = [
    p.PageRequest(((0, 1), (50, 50)), stamp=12345),
    p.Resume(((0, 100),), more=True),
    p.Resume(((3, 4),), started=True),
    p.RoundAck(7),
    p.DestDone({"pages_placed": 100, "ratio": 0.5, "verified": True}),
]


@pytest.mark.parametrize("event", SOURCE_EVENTS, ids=lambda e: type(e).__name__)
def test_source_events_round_trip(event: p.Event) -> None:
    src, dst = pair()
    got = deliver(src, dst, event)
    if isinstance(event, p.PageRun):
        assert (got.start, got.count, got.echo, bytes(got.payload)) == (3, 2, 2**62, bytes(event.payload))
    else:
        assert got == event
    assert dst.next_event() is p.NEED_DATA


@pytest.mark.parametrize("event", DEST_EVENTS, ids=lambda e: type(e).__name__)
def test_destination_events_round_trip(event: p.Event) -> None:
    src, dst = pair()
    assert deliver(dst, src, event) == event


def test_byte_by_byte_delivery_and_clean_close() -> None:
    src, dst = pair()
    data = wire(src, p.PageRun(0, 1, b"x" * PAGE)) + wire(src, p.SourceDone(1))
    events = []
    for i in range(len(data)):
        dst.receive_data(data[i:i + 1])
        while (e := dst.next_event()) is not p.NEED_DATA:
            events.append(e)
    assert [type(e) for e in events] == [p.PageRun, p.SourceDone]
    dst.receive_data(b"")
    assert dst.next_event() is p.CLOSED


def test_zero_copy_receive_buffer() -> None:
    src, dst = pair()
    data = wire(src, p.PageRun(1, 1, b"z" * PAGE))
    view = dst.receive_buffer(len(data))
    view[: len(data)] = data
    dst.commit(len(data))
    assert bytes(dst.next_event().payload) == b"z" * PAGE


def test_guest_info_teaches_the_guest_size() -> None:
    src, dst = pair(None)
    deliver(src, dst, p.GuestInfo(10, 1, 0, 1, 0, 0))
    with pytest.raises(RemoteProtocolError, match="outside the guest"):
        deliver(src, dst, p.ZeroRun(9, 2))


def test_page_runs_before_the_guest_is_known_are_refused() -> None:
    src, dst = pair(None)
    with pytest.raises(RemoteProtocolError, match="before the guest"):
        deliver(src, dst, p.ZeroRun(0, 1))


@pytest.mark.parametrize("data,match", [
    (b"HTTP/1.1 200 OK\r\n\r\n", "bad magic"),
    (struct.pack(">4sH", p.MAGIC, 99), "protocol version 99"),
    (raw(CONTROL, 2**32 - 1), "control frame length"),
    (raw(CONTROL, 0), "control frame length"),
    (raw(PAGES, 2**32 - 1, 0), "outside the guest"),
    (raw(PAGES, 1, 2**64 - 1), "outside the guest"),
    (raw(PAGES, 2, 99), "outside the guest"),
    (raw(ZEROS, 0, 5), "outside the guest"),
    (raw(ZEROS, 1, 5, flags=2), "unknown frame flags"),
    (raw(DISCARD, 1, 5, flags=REPLACE), "takes none"),
    (raw(CONTROL, 3, 0, b"\x91\x0a\x00", flags=REPLACE), "takes none"),
    (raw(DISCARD, 2, 99), "outside the guest"),
    (raw(DISCARD, 0, 0), "outside the guest"),
    (frame([6, 1, 2]), "fields"),
    (raw(77, 1), "unknown frame kind"),
    (raw(0, 1), "unknown frame kind"),
    (raw(REQUEST, 1, 0, b"\0" * 16), "never receives"),
    (frame([77]), "unknown control kind"),
    (frame("not a list"), "not \\[kind"),
    (frame([1, b"short"]), "nonce"),
    (frame([1, b"n" * 32, "extra"]), "fields"),
    (frame([2, "bulk", b"", b"n" * 32, b"p" * 32]), "unexpected Hello"),
    (frame([5, [[1, 2]], 0]), "vCPU state"),
    (frame([5, [], 0]), "1..256 vCPUs"),
    (frame([12, "x" * 5000]), "string"),
    (frame([4, 10, 2, 1, 1, 0, 0, 0, 65536]), "already described|65536-byte pages"),
    (frame([4, 10, 2, 1, 1, 0, 0, 3, 4096]), "mode"),
    (b"\xc1" * 3 + frame([1, b"n" * 32]), "bad magic"),
    (PREAMBLE + HEADER.pack(CONTROL, 3, 0, 0, 0, 0) + b"\xc1\xc1\xc1", "undecodable"),
])
def test_malformed_input_is_a_remote_protocol_error(data: bytes, match: str) -> None:
    # A Challenge is checked on a new connection, every other frame after the handshake.
    body = data[len(PREAMBLE) + p.FRAME_SIZE:]
    challenge = data[len(PREAMBLE):len(PREAMBLE) + 4] == struct.pack("<I", CONTROL) and body[1:2] == b"\x01"
    if data.startswith(PREAMBLE) and not challenge:
        dst, data = opened(p.Role.DESTINATION, 100), data[len(PREAMBLE):]
    else:
        dst = p.Connection(p.Role.DESTINATION, guest_pages=100)
    dst.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        dst.next_event()


def test_source_refuses_destination_only_kinds_and_bad_requests() -> None:
    for data, match in [
        (raw(PAGES, 1, 0, b"x" * PAGE), "never receives"),
        (raw(REQUEST, p.MAX_REQUEST_RUNS + 1, 0, b"\0" * 16 * (p.MAX_REQUEST_RUNS + 1)), "more than 64"),
        (raw(REQUEST, 1, 0, struct.pack("<QQ", 0, 0)), "0 or more than 256"),
        (raw(REQUEST, 1, 0, struct.pack("<QQ", 0, p.MAX_RUN_PAGES + 1)), "0 or more than 256"),
        (raw(REQUEST, 1, 0, struct.pack("<QQ", 99, 2)), "outside the guest"),
        (raw(REQUEST, 1, 0, struct.pack("<QQ", 2**64 - 1, 2)), "outside the guest"),
        (raw(DISCARD, 1, 0), "never receives"),
        (frame([9, [[0, 1]], False]), "fields"),
    ]:
        src = opened(p.Role.SOURCE, 100)
        src.receive_data(data[len(PREAMBLE):])
        with pytest.raises(RemoteProtocolError, match=match):
            src.next_event()


def test_a_second_guest_info_is_refused() -> None:
    src, dst = pair(None)
    deliver(src, dst, p.GuestInfo(10, 1, 0, 1, 0, 0))
    with pytest.raises(RemoteProtocolError, match="already described"):
        deliver(src, dst, p.GuestInfo(1000, 1, 0, 1, 0, 0))


def test_truncated_frame_then_close_is_an_error() -> None:
    src, dst = pair()
    dst.receive_data(wire(src, p.PageRun(0, 1, b"x" * PAGE))[:-10])
    assert dst.next_event() is p.NEED_DATA
    dst.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        dst.next_event()


def test_we_refuse_to_send_nonsense() -> None:
    src, _ = pair()
    with pytest.raises(LocalProtocolError):
        src.send(p.PageRun(0, 2, b"x" * PAGE))


def test_proofs_bind_key_role_channel_and_nonces() -> None:
    args = (p.Channel.BULK, b"a" * 32, b"b" * 32)
    base = p.prove(b"key", p.Role.DESTINATION, *args)
    assert p.proof_ok(base, p.prove(b"key", p.Role.DESTINATION, *args))
    assert not p.proof_ok(base, p.prove(b"other", p.Role.DESTINATION, *args))
    assert not p.proof_ok(base, p.prove(b"key", p.Role.SOURCE, *args))
    assert not p.proof_ok(base, p.prove(b"key", p.Role.DESTINATION, p.Channel.REPLIES, *args[1:]))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(list(p.Role)))
def test_fuzz_garbage_never_crashes(data: bytes, role: p.Role) -> None:
    conn = p.Connection(role, guest_pages=64)
    conn.receive_data(struct.pack(">4sH", p.MAGIC, p.VERSION) + data)
    try:
        while conn.next_event() is not p.NEED_DATA:
            pass
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.binary(max_size=40), st.text(max_size=10),
                          st.lists(st.integers(-5, 2**64 - 1), max_size=4), st.none(), st.floats()), max_size=8),
       st.integers(0, 13))
def test_fuzz_well_framed_hostile_control_frames(fields: list, kind: int) -> None:
    for role in p.Role:
        conn = p.Connection(role, guest_pages=64)
        conn.receive_data(frame([kind, *fields]))
        try:
            event = conn.next_event()
        except RemoteProtocolError:
            continue
        assert type(event) in p._ACCEPTS[role]


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 7), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
       st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)), st.integers(0, 200), st.sampled_from(list(p.Role)))
def test_fuzz_the_c_frame_check(kind: int, count: int, start: int, flags: int, pages: int, role: p.Role) -> None:
    """The C check the native loops use: whatever it accepts is in bounds, with the payload it implies."""
    f = p.ffi.new("struct wire_frame *", {"kind": kind, "count": count, "start": start, "flags": flags})
    why = p.ffi.new("char **")
    plen = p.lib.wire_check(f, pages, p._MASK[role], why)
    if plen < 0:
        assert p.ffi.string(why[0])
        return
    assert (p._MASK[role] >> kind) & 1
    assert flags == 0 or (flags == REPLACE and kind in (PAGES, ZEROS))
    if kind in (PAGES, ZEROS, DISCARD):
        assert 1 <= count and start + count <= pages
        assert plen == (count * PAGE if kind == PAGES else 0) and (kind != PAGES or count <= p.MAX_RUN_PAGES)
    elif kind == REQUEST:
        assert 1 <= count <= p.MAX_REQUEST_RUNS and plen == 16 * count
    else:
        assert 1 <= count <= 65536 and plen == count


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), min_size=1, max_size=4),
       st.integers(0, 300))
def test_fuzz_the_c_request_check(runs: list[tuple[int, int]], pages: int) -> None:
    arr = p.ffi.new("struct wire_run[]", [{"start": s, "count": n} for s, n in runs])
    ok = p.lib.wire_check_runs(arr, len(runs), pages, p.ffi.new("char **")) == 0
    assert ok == all(1 <= n <= p.MAX_RUN_PAGES and s + n <= pages for s, n in runs)


def test_one_resume_frame_names_no_more_than_the_guest() -> None:
    """Runs of the whole guest, many times over, would make the source send the guest again and again."""
    src = opened(p.Role.SOURCE, 100)
    src.receive_data(frame([9, [[0, 60], [50, 50]], True, False], preamble=False))
    with pytest.raises(RemoteProtocolError, match="Resume names 110 pages"):
        src.next_event()


def test_the_source_buffer_is_small_and_takes_the_largest_request() -> None:
    """The source receives requests and control frames, never pages: its buffer is sized for those
    (see test_idle_connections_cost_the_source_little_memory), and full page runs still go out."""
    src, dst = pair(1 << 30)
    assert src.rx.cap < 256 * 1024
    request = p.PageRequest(tuple((i << 20, p.MAX_RUN_PAGES) for i in range(p.MAX_REQUEST_RUNS)), stamp=2**63 - 1)
    assert deliver(dst, src, request) == request
    run = p.PageRun(0, p.MAX_RUN_PAGES, b"\0" * p.MAX_RUN_PAGES * PAGE)
    assert deliver(src, dst, run).count == run.count


def test_the_handshake_comes_first_in_order_and_once() -> None:
    src, dst = p.Connection(p.Role.SOURCE), p.Connection(p.Role.DESTINATION)
    challenge, welcome = p.Challenge(b"n" * 32), p.Welcome(b"s" * 16, b"p" * 32)
    hello = p.Hello(p.Channel.REPLIES, b"s" * 16, b"n" * 32, b"p" * 32)
    assert deliver(src, dst, challenge) == challenge and deliver(src, dst, welcome) == welcome
    assert deliver(dst, src, hello) == hello
    with pytest.raises(RemoteProtocolError, match="a second Challenge: the handshake is over"):
        deliver(src, dst, challenge)


@pytest.mark.parametrize("first,match", [
    (p.Welcome(b"s" * 16, b"p" * 32), "Welcome before the handshake's Challenge"),
    (p.GuestInfo(10, 1, 0, 1, 0, 0), "GuestInfo before the handshake's Challenge"),
    (p.SourceDone(1), "SourceDone before the handshake's Challenge"),
])
def test_out_of_order_frames_put_the_connection_in_error_for_good(first: p.Event, match: str) -> None:
    src, dst = p.Connection(p.Role.SOURCE), p.Connection(p.Role.DESTINATION)
    with pytest.raises(RemoteProtocolError, match=match):
        deliver(src, dst, first)
    dst.receive_data(wire(src, p.Challenge(b"n" * 32)))  # a correct frame after it changes nothing
    with pytest.raises(RemoteProtocolError, match=match):
        dst.next_event()


def test_an_error_frame_may_come_at_any_time() -> None:
    src, dst = p.Connection(p.Role.SOURCE), p.Connection(p.Role.DESTINATION)
    assert deliver(src, dst, p.Error("no")) == p.Error("no")
