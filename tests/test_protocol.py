"""The sans-io protocol: bytes in, events out; every bound holds against hostile input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from helpers import conversation, deliver, hostile
from migrate import protocol as p
from migrate._native import ffi, lib
from migrate.protocol import codec
from migrate.errors import LocalProtocolError, ProtocolViolation, RemoteProtocolError

PAGE = p.PAGE_SIZE


def pair(pages: int = 100) -> tuple[p.Connection, p.Connection]:
    """A source and a destination in the postcopy stream, where page frames flow."""
    return conversation(p.State.STREAMING, pages)


def wire(conn: p.Connection, event: p.Event) -> bytes:
    return b"".join(bytes(c) for c in conn.send(event))


def decoded(event: p.Event) -> p.Event:
    """``event`` through the codec alone (no order): encoded, then decoded from the bytes."""
    data = b"".join(bytes(c) for c in codec.encode(event))
    f = ffi.new("struct wire_frame *")
    ffi.memmove(f, data, p.FRAME_SIZE)
    return codec.decode(f, memoryview(data)[p.FRAME_SIZE:], 100, 12, ffi.new("char **"))


PREAMBLE = struct.pack(">4sH", p.MAGIC, p.VERSION)
# struct wire_frame, for hand-made hostile frames (native/wire.h): kind, count, start, stamp, held_ns, flags.
HEADER = struct.Struct("<IIQQII")
PAGES, ZEROS, REQUEST, CONTROL, DISCARD = 1, 2, 3, 4, 5
REPLACE = 1


def test_hand_made_header_matches_the_c_struct() -> None:
    assert HEADER.size == p.FRAME_SIZE
    assert HEADER.pack(PAGES, 2, 3, 4, 5, 0) == codec.header(lib.WIRE_PAGES, 2, 3, 4, 5)


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
    p.CpuState(((1, 2, 3), (2**64 - 1, 0, 5))), p.Running(), p.Downtime(850_000),
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


@pytest.mark.parametrize("event", SOURCE_EVENTS + DEST_EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_survives_the_codec(event: p.Event) -> None:
    got = decoded(event)
    if isinstance(event, p.PageRun):
        assert (got.start, got.count, got.echo, bytes(got.payload)) == (3, 2, 2**62, bytes(event.payload))
    else:
        assert got == event


def test_every_field_of_every_control_kind_is_described_once() -> None:
    """The control table drives both directions: a field it misses would be lost on the way."""
    import dataclasses
    for cls, (kind, fields, _) in codec.CONTROL.items():
        assert [f.name for f in fields] == [f.name for f in dataclasses.fields(cls)]
    assert len({kind for kind, _, _ in codec.CONTROL.values()}) == len(codec.CONTROL)


def test_every_header_reaches_the_c_check_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    """``wire_check`` reads a ``struct wire_frame``, whose 8-byte fields C may only read 8-byte aligned
    (UBSan: "member access within misaligned address"); in the receive buffer a header follows the
    6-byte preamble, and frames of any length, so the Connection must hand C an aligned copy."""
    seen: list[int] = []

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(lib, name)

        @staticmethod
        def wire_check(f: object, *args: object) -> int:
            seen.append(int(ffi.cast("uintptr_t", f)) % ffi.alignof("struct wire_frame"))
            return lib.wire_check(f, *args)

    from migrate.protocol import connection
    monkeypatch.setattr(connection, "lib", Spy())
    _, dst = pair()
    new = p.Connection(p.Role.DESTINATION)
    streams = [(new, hostile(p.Challenge(b"n" * 32), preamble=True)),  # right after the 6-byte preamble
               (dst, hostile(p.ZeroRun(0, 1)) + hostile(p.Error("odd")) + hostile(p.Error("e")))]  # odd sizes
    for conn, data in streams:
        conn.receive_data(data)
        while conn.next_event() is not p.NEED_DATA:
            pass
    assert len(seen) >= 4 and set(seen) == {0}


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
    src, dst = conversation(p.State.DESCRIBING, 10)
    assert dst.conversation.guest is None
    deliver(src, dst, p.GuestInfo(10, 1, 0, 1, 0, 0))
    deliver(src, dst, p.CpuState(((1, 2, 3),)))
    deliver(dst, src, p.Running())
    deliver(src, dst, p.Downtime(1))
    dst.receive_data(hostile(p.ZeroRun(9, 2)))
    with pytest.raises(RemoteProtocolError, match="outside the guest"):
        dst.next_event()


def test_page_runs_before_the_guest_is_described_are_refused() -> None:
    _, dst = conversation(p.State.DESCRIBING)
    dst.receive_data(hostile(p.ZeroRun(0, 1)))
    with pytest.raises(RemoteProtocolError, match="may not come now"):
        dst.next_event()


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
    (raw(REQUEST, 1, 0, b"\0" * 16), "may not come now"),
    (frame([77]), "unknown control kind"),
    (frame("not a list"), "not \\[kind"),
    (frame([1, b"short"]), "nonce"),
    (frame([1, b"n" * 32, "extra"]), "fields"),
    (frame([2, "bulk", b"", b"n" * 32, b"p" * 32]), "Hello\\(bulk, new\\) from the source during a precopy round"),
    (frame([5, [[1, 2]]]), "vCPU state"),
    (frame([5, []]), "1..256 vCPUs"),
    (frame([12, "x" * 5000]), "string"),
    (frame([4, 10, 2, 1, 1, 0, 0, 0, 65536, 0]), "65536-byte pages for memory of kind 0"),
    (frame([4, 10, 2, 1, 1, 0, 0, 0, 4096, 2]), "4096-byte pages for memory of kind 2"),
    (frame([4, 10, 2, 1, 1, 0, 0, 0, 4096, 3]), "memory"),
    (frame([4, 10, 2, 1, 1, 0, 0, 3, 4096, 0]), "mode"),
    (b"\xc1" * 3 + frame([1, b"n" * 32]), "bad magic"),
    (PREAMBLE + HEADER.pack(CONTROL, 3, 0, 0, 0, 0) + b"\xc1\xc1\xc1", "undecodable"),
])
def test_malformed_input_is_a_remote_protocol_error(data: bytes, match: str) -> None:
    """Checked by a destination in a precopy round (page, zero and discard frames allowed) or, for
    a bad preamble, on a new connection."""
    if data.startswith(PREAMBLE):
        _, dst = conversation(p.State.ROUND)
        data = data[len(PREAMBLE):]
    else:
        dst = p.Connection(p.Role.DESTINATION)
    dst.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        dst.next_event()


@pytest.mark.parametrize("data,match", [
    (raw(PAGES, 1, 0, b"x" * PAGE), "may not come now"),
    (raw(REQUEST, p.MAX_REQUEST_RUNS + 1, 0, b"\0" * 16 * (p.MAX_REQUEST_RUNS + 1)), "more than 64"),
    (raw(REQUEST, 1, 0, struct.pack("<QQ", 0, 0)), "0 pages or more than a frame carries"),
    (raw(REQUEST, 1, 0, struct.pack("<QQ", 0, p.MAX_RUN_PAGES + 1)), "0 pages or more than a frame carries"),
    (raw(REQUEST, 1, 0, struct.pack("<QQ", 99, 2)), "outside the guest"),
    (raw(REQUEST, 1, 0, struct.pack("<QQ", 2**64 - 1, 2)), "outside the guest"),
    (raw(DISCARD, 1, 0), "a discard where none may come"),
    (frame([9, [[0, 1]], False]), "fields"),
    (frame([11, {"pages_placed": 100, "ratio": float("nan")}]), "finite numbers"),  # found by scripts/fuzz
    (frame([11, {"faults": float("inf")}]), "finite numbers"),
])
def test_the_source_refuses_bad_requests(data: bytes, match: str) -> None:
    src, _ = conversation(p.State.REQUESTING)
    src.receive_data(data[len(PREAMBLE):])
    with pytest.raises(RemoteProtocolError, match=match):
        src.next_event()


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


def test_the_handshake_proves_the_key_both_ways() -> None:
    challenge = p.Challenge(p.new_nonce())
    hello = p.hello(b"key", p.Channel.BULK, b"", challenge)
    p.check_hello(b"key", challenge, hello)
    with pytest.raises(RemoteProtocolError, match="destination does not know the key"):
        p.check_hello(b"other", challenge, hello)
    welcome = p.welcome(b"key", challenge, hello, b"s" * 16)
    p.check_welcome(b"key", challenge, hello, welcome)
    with pytest.raises(RemoteProtocolError, match="source does not know the key"):
        p.check_welcome(b"key", challenge, hello, p.welcome(b"other", challenge, hello, b"s" * 16))


# -- order: the table in migrate/protocol/state.py ----------------------------
def test_every_state_is_reachable_and_every_move_leads_somewhere_known() -> None:
    seen, todo = {p.State.START}, [p.State.START]
    while todo:
        for after in p.TABLE[todo.pop()][1].values():
            if after not in seen:
                seen.add(after)
                todo.append(after)
    assert seen | {p.State.ENDED} == set(p.State) == set(p.TABLE)


def run_through(steps: list[tuple[p.Role, p.Event]], src: p.Connection, dst: p.Connection) -> None:
    for who, event in steps:
        sender, receiver = (src, dst) if who is p.Role.SOURCE else (dst, src)
        assert deliver(sender, receiver, event) == event


S, D = p.Role.SOURCE, p.Role.DESTINATION


def test_rounds_then_switchover_then_stream_is_one_legal_conversation() -> None:
    src, dst = conversation(p.State.ROUND)
    assert dst.accepts & (1 << DISCARD)  # during a round: what its native placer may obey
    run_through([(S, p.RoundEnd(1)), (D, p.RoundAck(1)), (S, p.Round(2, 5)), (S, p.RoundEnd(2)), (D, p.RoundAck(2)),
                 (S, p.Round(3, 0, final=True)), (S, p.CpuState(((1, 2, 3),))), (D, p.Running()), (S, p.Downtime(1)),
                 (S, p.SourceDone(100))],
                src, dst)
    assert dst.state is p.State.STREAMED


@pytest.mark.parametrize("resume,state", [
    ((p.Resume(((0, 50),), more=True), p.Resume(((50, 50),), started=True)), p.State.STREAMING),
    ((p.Resume(((0, 100),)),), p.State.AWAITING_CPU),  # postcopy, switchover not done: the CPU state comes again
])
def test_a_rejoined_bulk_connection_goes_where_the_resume_says(resume: tuple[p.Resume, ...], state: p.State) -> None:
    src, dst = conversation(p.State.RESUMING)
    run_through([(D, r) for r in resume], src, dst)
    assert src.state is dst.state is state


@pytest.mark.parametrize("to,sender,event,match", [
    (p.State.BETWEEN_ROUNDS, S, p.CpuState(((1, 2, 3),)), "CpuState from the source between precopy rounds"),
    (p.State.AWAITING_CPU, S, p.Round(1, 5), "Round from the source before the switchover \\(postcopy\\)"),
    (p.State.AWAITING_CPU, S, p.GuestInfo(1000, 1, 0, 1, 0, 0), "GuestInfo\\(postcopy\\) from the source"),
    (p.State.ROUND, S, p.RoundEnd(2), "RoundEnd\\(2\\) during round 1"),
    (p.State.ROUND, S, p.SourceDone(1), "SourceDone from the source during a precopy round"),
    (p.State.FINAL_ROUND, S, p.RoundEnd(1), "RoundEnd from the source during the final round"),
    (p.State.FINAL_ROUND, S, p.CpuState(((1, 2, 3), (4, 5, 6))), "the state of 2 vCPUs for a guest of 1"),
    (p.State.STREAMING, S, p.Discard(0, 1), "a discard where none may come"),
    (p.State.STREAMING, S, p.ZeroRun(0, 1, replace=True), "a replacement where no discard may come"),
    (p.State.STREAMING, S, p.CpuState(((1, 2, 3),)), "CpuState from the source during the postcopy stream"),
    (p.State.REPLYING, S, p.SourceDone(1), "SourceDone from the source on the replies connection"),
    (p.State.REPLYING, S, p.Discard(0, 1), "a discard where none may come"),
    (p.State.STREAMING, D, p.DestDone({}), "DestDone from the destination during the postcopy stream"),
    (p.State.STREAMING, D, p.PageRequest(((0, 1),), 0), "may not come now"),
    (p.State.REQUESTING, D, p.Resume(((0, 1),)), "Resume\\(waiting, postcopy\\) from the destination"),
    (p.State.RESUMING, D, p.Resume(((0, 60), (50, 50)), more=True), "Resume names 110 pages"),
    (p.State.DESCRIBING, S, p.Challenge(b"n" * 32), "Challenge from the source before the GuestInfo"),
])
def test_a_frame_out_of_order_is_refused_on_receipt_and_on_sending(to: p.State, sender: p.Role, event: p.Event,
                                                                   match: str) -> None:
    """Each side checks the same table: a peer's violation is its error (a violation, data frames too:
    never a lost link to recover from), our own is a bug of ours."""
    src, dst = conversation(to)
    ours, theirs = (src, dst) if sender is S else (dst, src)
    theirs.receive_data(hostile(event))
    with pytest.raises(ProtocolViolation, match=match):
        theirs.next_event()
    with pytest.raises(LocalProtocolError, match=match):
        ours.send(event)


def test_the_pages_of_resume_frames_add_up_to_the_guest_at_most() -> None:
    """Frame after frame saying "more" would otherwise make the source send the guest again and again."""
    src, dst = conversation(p.State.RESUMING)
    run_through([(D, p.Resume(((0, 60),), more=True))], src, dst)
    src.receive_data(hostile(p.Resume(((0, 60),), more=True)))
    with pytest.raises(RemoteProtocolError, match="Resume names 120 pages"):
        src.next_event()


def test_a_round_number_never_goes_back() -> None:
    src, dst = conversation(p.State.ROUND)
    run_through([(S, p.RoundEnd(1)), (D, p.RoundAck(1))], src, dst)
    dst.receive_data(hostile(p.Round(1, 5)))
    with pytest.raises(RemoteProtocolError, match="round 1 after round 1"):
        dst.next_event()


def test_a_new_session_is_opened_on_the_bulk_connection_only() -> None:
    src = p.Connection(S)
    src.send(p.Challenge(b"n" * 32))
    src.receive_data(hostile(p.Hello(p.Channel.REQUESTS, b"", b"n" * 32, b"p" * 32), preamble=True))
    with pytest.raises(RemoteProtocolError, match="Hello\\(requests, new\\) from the destination after the Challenge"):
        src.next_event()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(list(p.Role)), st.booleans())
def test_fuzz_garbage_is_refused_or_a_move_of_the_table(data: bytes, role: p.Role, closes: bool) -> None:
    """Bytes from a hostile peer after a valid preamble: each event accepted is a move of the table from
    the state the connection was in; anything else is a RemoteProtocolError, after which the connection
    is broken for good (the same error again); a close in the middle of a frame
    is an error, a close between frames is CLOSED."""
    conn = p.Connection(role)
    conn.receive_data(struct.pack(">4sH", p.MAGIC, p.VERSION) + data)
    if closes:
        conn.receive_data(b"")
    peer = D if role is S else S
    while True:
        before = conn.state
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            assert str(exc)
            with pytest.raises(RemoteProtocolError) as again:
                conn.next_event()
            assert again.value is exc
            return
        if event is p.NEED_DATA:
            assert not closes
            return
        if event is p.CLOSED:
            assert closes
            return
        assert isinstance(event, p.Error) or (peer, p.state.label(event, conn.conversation.guest)) in p.TABLE[before][1]


STATES = [p.State.DESCRIBING, p.State.AWAITING_CPU, p.State.BETWEEN_ROUNDS, p.State.ROUND, p.State.FINAL_ROUND,
          p.State.STREAMING, p.State.RESUMING, p.State.REQUESTING, p.State.REPLYING]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.binary(max_size=40), st.text(max_size=10),
                          st.lists(st.integers(-5, 2**64 - 1), max_size=4), st.none(), st.floats()), max_size=8),
       st.integers(0, 13), st.sampled_from(STATES))
def test_fuzz_well_framed_hostile_control_frames(fields: list, kind: int, to: p.State) -> None:
    """Whatever a hostile peer sends, what is accepted is a move of the table from where it was."""
    for conn in conversation(to):
        conn.receive_data(frame([kind, *fields], preamble=False))
        try:
            event = conn.next_event()
        except RemoteProtocolError:
            continue
        peer = D if conn.role is S else S
        assert isinstance(event, p.Error) or (peer, p.state.label(event, conn.conversation.guest)) in p.TABLE[to][1]


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 7), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
       st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)), st.integers(0, 200), st.integers(0, 63))
def test_fuzz_the_c_frame_check(kind: int, count: int, start: int, flags: int, pages: int, accept: int) -> None:
    """The C check the native loops use: whatever it accepts is allowed and in bounds, with the payload it implies."""
    f = ffi.new("struct wire_frame *", {"kind": kind, "count": count, "start": start, "flags": flags})
    why = ffi.new("char **")
    plen = lib.wire_check(f, pages, 12, accept, why)
    if plen < 0:
        assert ffi.string(why[0])
        return
    assert (accept >> kind) & 1
    assert flags == 0 or (flags == REPLACE and kind in (PAGES, ZEROS) and accept & (1 << DISCARD))
    if kind in (PAGES, ZEROS, DISCARD):
        assert 1 <= count and start + count <= pages
        assert plen == (count * PAGE if kind == PAGES else 0) and (kind == DISCARD or count <= p.MAX_RUN_PAGES)
    elif kind == REQUEST:
        assert 1 <= count <= p.MAX_REQUEST_RUNS and plen == 16 * count
    else:
        assert 1 <= count <= 65536 and plen == count


@pytest.mark.parametrize("kind", [PAGES, ZEROS])
def test_a_run_of_more_than_256_pages_is_refused(kind: int) -> None:
    """A zero run is bounded like a page run: the placer walks a present page per ioctl, so an unbounded
    count would hold it for as long as the peer likes.  A discard stays one madvise, unbounded."""
    why = ffi.new("char **")
    for count, ok in ((p.MAX_RUN_PAGES, True), (p.MAX_RUN_PAGES + 1, False)):
        f = ffi.new("struct wire_frame *", {"kind": kind, "count": count})
        assert (lib.wire_check(f, 1000, 12, 1 << kind, why) >= 0) == ok
    assert ffi.string(why[0]) == b"page or zero run longer than 1 MiB or one page"
    f = ffi.new("struct wire_frame *", {"kind": DISCARD, "count": 1000})
    assert lib.wire_check(f, 1000, 12, 1 << DISCARD, why) == 0


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), min_size=1, max_size=4),
       st.integers(0, 300))
def test_fuzz_the_c_request_check(runs: list[tuple[int, int]], pages: int) -> None:
    arr = ffi.new("struct wire_run[]", [{"start": s, "count": n} for s, n in runs])
    ok = lib.wire_check_runs(arr, len(runs), pages, 12, ffi.new("char **")) == 0
    assert ok == all(1 <= n <= p.MAX_RUN_PAGES and s + n <= pages for s, n in runs)


def test_the_source_buffer_is_small_and_takes_the_largest_request() -> None:
    """The source receives requests and control frames, never pages: its buffer is sized for those
    (see test_idle_connections_cost_the_source_little_memory), and full page runs still go out."""
    src, dst = conversation(p.State.REQUESTING, 1 << 30)
    assert src.rx.cap < 256 * 1024
    request = p.PageRequest(tuple((i << 20, p.MAX_RUN_PAGES) for i in range(p.MAX_REQUEST_RUNS)), stamp=2**63 - 1)
    assert deliver(dst, src, request) == request
    src, dst = conversation(p.State.REPLYING, 1 << 30)
    run = p.PageRun(0, p.MAX_RUN_PAGES, b"\0" * p.MAX_RUN_PAGES * PAGE)
    assert deliver(src, dst, run).count == run.count


def test_the_handshake_comes_first_in_order_and_once() -> None:
    src, dst = conversation(p.State.REPLYING)
    with pytest.raises(RemoteProtocolError, match="Challenge from the source on the replies connection"):
        dst.receive_data(hostile(p.Challenge(b"n" * 32)))
        dst.next_event()


@pytest.mark.parametrize("first,match", [
    (p.Welcome(b"s" * 16, b"p" * 32), "Welcome from the source before the Challenge"),
    (p.GuestInfo(10, 1, 0, 1, 0, 0), "GuestInfo\\(postcopy\\) from the source before the Challenge"),
    (p.SourceDone(1), "SourceDone from the source before the Challenge"),
])
def test_out_of_order_frames_put_the_connection_in_error_for_good(first: p.Event, match: str) -> None:
    dst = p.Connection(p.Role.DESTINATION)
    dst.receive_data(hostile(first, preamble=True))
    with pytest.raises(RemoteProtocolError, match=match):
        dst.next_event()
    dst.receive_data(hostile(p.Challenge(b"n" * 32)))  # a correct frame after it changes nothing
    with pytest.raises(RemoteProtocolError, match=match):
        dst.next_event()


def test_an_error_frame_may_come_at_any_time() -> None:
    src, dst = p.Connection(p.Role.SOURCE), p.Connection(p.Role.DESTINATION)
    assert deliver(src, dst, p.Error("no")) == p.Error("no")
    assert dst.state is p.State.ENDED
