"""The sans-io protocol: bytes in, events out; every bound holds against hostile input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from migrate import protocol as p
from migrate.errors import LocalProtocolError, RemoteProtocolError

PAGE = p.PAGE_SIZE


def pair(pages: int = 100) -> tuple[p.Connection, p.Connection]:
    return p.Connection(p.Role.SOURCE, guest_pages=pages), p.Connection(p.Role.DESTINATION, guest_pages=pages)


def wire(conn: p.Connection, event: p.Event) -> bytes:
    return b"".join(bytes(c) for c in conn.send(event))


def deliver(sender: p.Connection, receiver: p.Connection, event: p.Event) -> p.Event:
    receiver.receive_data(wire(sender, event))
    return receiver.next_event()


def frame(header: object, payload: bytes = b"", preamble: bool = True) -> bytes:
    h = msgpack.packb(header)
    out = struct.pack(">4sH", p.MAGIC, p.VERSION) if preamble else b""
    return out + struct.pack(">II", len(h), len(payload)) + h + payload


SOURCE_EVENTS = [
    p.Challenge(b"n" * 32),
    p.Welcome(b"s" * 16, b"p" * 32),
    p.GuestInfo(pages=100, vcpus=2, workload=1, seed=2**64 - 1, zero_permille=250, rate=0),
    p.CpuState(((1, 2, 3), (2**64 - 1, 0, 5)), 1_700_000_000_000_000_000),
    p.PageRun(3, 2, b"\xab" * (2 * PAGE), echo=2**62),
    p.ZeroRun(99, 1, echo=7),
    p.SourceDone(100),
    p.Error("gone"),
]
DEST_EVENTS = [
    p.Hello(p.Channel.URGENT, b"s" * 16, b"n" * 32, b"p" * 32),
    p.PageRequest(((0, 1), (50, 50)), stamp=12345),
    p.Resume(((0, 100),), more=True),
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
    src, dst = p.Connection(p.Role.SOURCE), p.Connection(p.Role.DESTINATION)
    deliver(src, dst, p.GuestInfo(10, 1, 0, 1, 0, 0))
    with pytest.raises(RemoteProtocolError, match="outside the guest"):
        deliver(src, dst, p.ZeroRun(9, 2))


def test_page_runs_before_the_guest_is_known_are_refused() -> None:
    src, dst = p.Connection(p.Role.SOURCE), p.Connection(p.Role.DESTINATION)
    with pytest.raises(RemoteProtocolError, match="before the guest"):
        deliver(src, dst, p.ZeroRun(0, 1))


@pytest.mark.parametrize("data,match", [
    (b"HTTP/1.1 200 OK\r\n\r\n", "bad magic"),
    (struct.pack(">4sH", p.MAGIC, 99), "protocol version 99"),
    (frame([1, b"n" * 32])[:6] + struct.pack(">II", 2**32 - 1, 0), "header length"),
    (frame([1, b"n" * 32])[:6] + struct.pack(">II", 10, 2**32 - 1), "payload length"),
    (frame([1, b"n" * 32])[:6] + struct.pack(">II", 0, 0), "header length"),
    (frame([77]), "unknown frame kind"),
    (frame("not a list"), "not \\[kind"),
    (frame([1, b"short"]), "nonce"),
    (frame([1, b"n" * 32, "extra"]), "fields"),
    (frame([2, "bulk", b"", b"n" * 32, b"p" * 32]), "unexpected Hello"),
    (frame([6, 0, 2, 0], b"x" * PAGE), "carries 4096 bytes"),
    (frame([6, 0, -1, 0], b""), "count"),
    (frame([6, 2**63 + 5, 1, 0], b"x" * PAGE), "start"),
    (frame([6, 99, 2, 0], b"x" * 2 * PAGE), "outside the guest"),
    (frame([7, 0, 1, 0], b"junk"), "with a payload"),
    (frame([5, [[1, 2]], 0]), "vCPU state"),
    (frame([5, [], 0]), "1..256 vCPUs"),
    (frame([12, "x" * 5000]), "string"),
    (frame([4, 10, 2, 1, 1, 0, 0, 65536]), "65536-byte pages"),
    (b"\xc1" * 3 + frame([1, b"n" * 32]), "bad magic"),
    (frame([1, b"n" * 32])[:6] + struct.pack(">II", 3, 0) + b"\xc1\xc1\xc1", "undecodable"),
])
def test_malformed_input_is_a_remote_protocol_error(data: bytes, match: str) -> None:
    dst = p.Connection(p.Role.DESTINATION, guest_pages=100)
    dst.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        dst.next_event()


def test_source_refuses_destination_only_kinds_and_oversized_requests() -> None:
    src = p.Connection(p.Role.SOURCE, guest_pages=100)
    src.receive_data(frame([6, 0, 1, 0], b"x" * PAGE))
    with pytest.raises(RemoteProtocolError, match="unexpected PageRun"):
        src.next_event()
    src = p.Connection(p.Role.SOURCE, guest_pages=100)
    src.receive_data(frame([8, [[0, 1]] * (p.MAX_REQUEST_RUNS + 1), 0]))
    with pytest.raises(RemoteProtocolError, match="page runs"):
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
    assert not p.proof_ok(base, p.prove(b"key", p.Role.DESTINATION, p.Channel.URGENT, *args[1:]))


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
       st.integers(0, 13), st.binary(max_size=3 * PAGE))
def test_fuzz_well_framed_hostile_headers(fields: list, kind: int, payload: bytes) -> None:
    for role in p.Role:
        conn = p.Connection(role, guest_pages=64)
        conn.receive_data(frame([kind, *fields], payload))
        try:
            event = conn.next_event()
        except RemoteProtocolError:
            continue
        assert type(event) in p._ACCEPTS[role]


def test_one_request_or_resume_frame_names_no_more_than_the_guest() -> None:
    """1,024 runs of the whole guest would make the source send the guest 1,024 times for one frame."""
    src = p.Connection(p.Role.SOURCE, guest_pages=100)
    src.receive_data(frame([8, [[0, 100]] * 2, 0]))
    with pytest.raises(RemoteProtocolError, match="PageRequest names 200 pages, more than the guest's 100"):
        src.next_event()
    src = p.Connection(p.Role.SOURCE, guest_pages=100)
    src.receive_data(frame([9, [[0, 60], [50, 50]], True]))
    with pytest.raises(RemoteProtocolError, match="Resume names 110 pages"):
        src.next_event()
    src = p.Connection(p.Role.SOURCE, guest_pages=100)
    src.receive_data(frame([8, [[0, 50], [50, 50]], 0]))
    assert src.next_event() == p.PageRequest(((0, 50), (50, 50)), 0)


def test_a_connection_that_accepts_no_payload_takes_the_largest_request_and_sends_full_runs() -> None:
    """The source's side (max_payload=0, so its receive buffer has no room for pages; see
    test_idle_connections_cost_the_source_little_memory)."""
    src = p.Connection(p.Role.SOURCE, max_payload=0, guest_pages=1 << 30)
    dst = p.Connection(p.Role.DESTINATION, guest_pages=1 << 30)
    request = p.PageRequest(tuple((i << 20, 1) for i in range(p.MAX_REQUEST_RUNS)), stamp=2**63 - 1)
    assert deliver(dst, src, request) == request
    run = p.PageRun(0, p.DEFAULT_MAX_PAYLOAD // PAGE, b"\0" * p.DEFAULT_MAX_PAYLOAD)
    assert deliver(src, dst, run).count == run.count
    src.receive_data(frame([6, 0, 1, 0], b"x" * PAGE, preamble=False))
    with pytest.raises(RemoteProtocolError, match="payload length 4096 exceeds the limit 0"):
        src.next_event()
