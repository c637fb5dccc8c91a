"""How events become bytes and back: the preamble, data frames, and one table for control frames.

Every frame starts with ``struct wire_frame`` of ``native/wire.h``, the one
definition of the wire layout, which the native loops use too; this module
reads and writes that struct through cffi, so Python and C cannot drift.

- Data frames (page runs, zero runs, discards, page requests) are the struct
  and a raw payload: the hot path's format, spoken by the native loops.
- Control frames are the struct and a msgpack body ``[kind, fields...]``,
  spoken by Python.  ``CONTROL`` describes each kind once, field by field, and
  both directions are generated from that description.

Decoding checks every field's type and range, so a hostile peer gets a
``RemoteProtocolError``, never a crash or an unbounded value.  Order is not
checked here: that is ``state.py``.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from .._native import ffi, lib
from ..errors import LocalProtocolError, RemoteProtocolError
from .events import (MAX_PAYLOAD, MAX_REQUEST_RUNS, MAX_RESUME_RUNS, NONCE_LEN, PAGE_SIZE, Challenge, Channel,
                     CpuState, DestDone, Discard, Downtime, Error, Event, GuestInfo, Hello, Mode, PageRequest, PageRun,
                     Resume, Round, RoundAck, RoundEnd, Running, SourceDone, Welcome, ZeroRun)

MAGIC = b"UFMG"
# 3: migration modes (Round, RoundEnd, RoundAck, discards, replace flag); 4: Running and Downtime (downtime
# on one clock); 5: GuestInfo.memory, and pages of GuestInfo.page_size (2 MiB on hugetlb)
VERSION = 5
PREAMBLE = struct.Struct(">4sH")
FRAME_SIZE: int = lib.WIRE_FRAME_SIZE
MAX_CONTROL: int = lib.WIRE_MAX_CONTROL
_U64 = 1 << 64
_MAX_TEXT = 1024
Chunks = list[bytes | memoryview]


def preamble() -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION)


def check_preamble(data: bytes | memoryview) -> None:
    """Raises RemoteProtocolError, with a hint, unless ``data`` is our preamble."""
    magic, version = PREAMBLE.unpack(data)
    if magic[:1] == b"\x16":  # a TLS handshake record
        raise RemoteProtocolError("the peer speaks TLS and this end does not (bad magic)",
                                  hint="give both sides --tls-cert, --tls-key and --tls-ca, or neither")
    if magic != MAGIC:
        raise RemoteProtocolError("the peer is not a uffd-migrate process (bad magic)", hint="check the host and port")
    if version != VERSION:
        raise RemoteProtocolError(f"the peer speaks protocol version {version}, we speak {VERSION}",
                                  hint="run the same uffd-migrate version on both hosts")


def header(kind: int, count: int, start: int = 0, stamp: int = 0, held_ns: int = 0, flags: int = 0) -> bytes:
    """A ``struct wire_frame``, as bytes."""
    f = ffi.new("struct wire_frame *", {"kind": kind, "count": count, "start": start, "stamp": stamp,
                                        "held_ns": held_ns, "flags": flags})
    return bytes(ffi.buffer(f))


# -- data frames: each kind's two directions side by side ----------------------
def _flags(replace: bool) -> int:
    return lib.WIRE_REPLACE if replace else 0


def encode(event: Event, page_size: int = PAGE_SIZE) -> Chunks:
    """The chunks of one frame, in order (a page run's payload is not copied); pages are of ``page_size``.

    Raises:
        LocalProtocolError: the event breaks a bound of the wire.
    """
    if isinstance(event, PageRun):
        max_run = lib.wire_max_run(page_size.bit_length() - 1)
        if len(event.payload) != event.count * page_size or not 0 < event.count <= max_run:
            raise LocalProtocolError(f"page run of {event.count} pages with {len(event.payload)} bytes")
        return [header(lib.WIRE_PAGES, event.count, event.start, event.echo, event.held_ns, _flags(event.replace)),
                event.payload]
    if isinstance(event, ZeroRun):
        return [header(lib.WIRE_ZEROS, event.count, event.start, event.echo, event.held_ns, _flags(event.replace))]
    if isinstance(event, Discard):
        return [header(lib.WIRE_DISCARD, event.count, event.start)]
    if isinstance(event, PageRequest):
        if not 0 < len(event.runs) <= MAX_REQUEST_RUNS:
            raise LocalProtocolError(f"{len(event.runs)} runs in one request; split it")
        runs = ffi.new("struct wire_run[]", [{"start": s, "count": n} for s, n in event.runs])
        return [header(lib.WIRE_REQUEST, len(event.runs), stamp=event.stamp), bytes(ffi.buffer(runs))]
    kind, fields, _ = CONTROL[type(event)]
    body = msgpack.packb([kind, *(f.encode(getattr(event, f.name)) for f in fields)])
    if len(body) > MAX_CONTROL:
        raise LocalProtocolError(f"{type(event).__name__} of {len(body)} bytes is too large")
    return [header(lib.WIRE_CONTROL, len(body)), body]


def decode(f: Any, payload: memoryview, guest_pages: int, page_shift: int, why: Any) -> Event:
    """The event of a frame whose header ``f`` passed ``wire_check`` and whose payload is all here."""
    replace = bool(f.flags & lib.WIRE_REPLACE)
    if f.kind == lib.WIRE_PAGES:
        return PageRun(f.start, f.count, payload, f.stamp, f.held_ns, replace)
    if f.kind == lib.WIRE_ZEROS:
        return ZeroRun(f.start, f.count, f.stamp, f.held_ns, replace)
    if f.kind == lib.WIRE_DISCARD:
        return Discard(f.start, f.count)
    if f.kind == lib.WIRE_REQUEST:
        runs = ffi.new("struct wire_run[]", f.count)
        ffi.memmove(runs, payload, len(payload))
        if lib.wire_check_runs(runs, f.count, guest_pages, page_shift, why) < 0:
            raise RemoteProtocolError(ffi.string(why[0]).decode())
        return PageRequest(tuple((r.start, r.count) for r in runs), f.stamp)
    return _decode_control(bytes(payload))


# -- control frames: one description per kind --------------------------------
@dataclasses.dataclass(frozen=True)
class Field:
    """How one event field crosses a control frame: ``encode`` to msgpack, ``decode`` back, checked."""

    name: str
    decode: Callable[[object, str], object]
    encode: Callable[[Any], object] = lambda v: v


def _int(v: object, name: str, hi: int = 1 << 63) -> int:
    if type(v) is not int or not 0 <= v < hi:
        raise RemoteProtocolError(f"field {name} is not an integer in 0..{hi - 1}")
    return v


def _bytes(v: object, name: str, size: int | None = None, hi: int = 64) -> bytes:
    if type(v) is not bytes or len(v) > hi or (size is not None and len(v) != size):
        raise RemoteProtocolError(f"field {name} is not a byte string of the expected size")
    return v


def _text(v: object, name: str) -> str:
    if type(v) is not str or len(v) > _MAX_TEXT:
        raise RemoteProtocolError(f"field {name} is not a string of at most {_MAX_TEXT} characters")
    return v


def _bool(v: object, name: str) -> bool:
    if type(v) is not bool:
        raise RemoteProtocolError(f"field {name} is not a boolean")
    return v


def _channel(v: object, name: str) -> Channel:
    try:
        return Channel(v)
    except ValueError:
        raise RemoteProtocolError(f"unknown channel {v!r}") from None


def _runs(v: object, name: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, tuple) or len(v) > MAX_RESUME_RUNS:
        raise RemoteProtocolError(f"{name} must be a list of at most {MAX_RESUME_RUNS} [start, count]")
    out = []
    for r in v:
        if not isinstance(r, tuple) or len(r) != 2:
            raise RemoteProtocolError("a page run is not [start, count]")
        out.append((_int(r[0], "start", 1 << 40), _int(r[1], "count", 1 << 40)))
    return tuple(out)


def _encode_runs(runs: tuple[tuple[int, int], ...]) -> list[list[int]]:
    if len(runs) > MAX_RESUME_RUNS:
        raise LocalProtocolError(f"{len(runs)} runs in one Resume; split it")
    return [list(r) for r in runs]


def _vcpus(v: object, name: str) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(v, tuple) or not 0 < len(v) <= 256:
        raise RemoteProtocolError("CPU state must list 1..256 vCPUs")
    states = []
    for s in v:
        if not isinstance(s, tuple) or len(s) != 3:
            raise RemoteProtocolError("a vCPU state is not [prng, steps, acc]")
        states.append((_int(s[0], "prng", _U64), _int(s[1], "steps", _U64), _int(s[2], "acc", _U64)))
    return tuple(states)


def _counters(v: object, name: str) -> dict[str, float]:
    if not isinstance(v, dict) or len(v) > 64 or not all(
            isinstance(k, str) and len(k) <= 64 and type(n) in (int, float, bool) and math.isfinite(n)
            for k, n in v.items()):
        raise RemoteProtocolError("DestDone counters must be a small map of names to finite numbers")
    return v


def uint(name: str, hi: int = 1 << 63) -> Field:
    return Field(name, lambda v, n: _int(v, n, hi))


def blob(name: str, size: int | None = None, hi: int = 32) -> Field:
    return Field(name, lambda v, n: _bytes(v, n, size, hi))


def flag(name: str) -> Field:
    return Field(name, _bool)


# Each memory kind's page (migrate.memory.Memory): anon, memfd, hugetlb.
_PAGE_OF_KIND = (PAGE_SIZE, PAGE_SIZE, MAX_PAYLOAD)


def _check_guest_info(info: GuestInfo) -> None:
    if info.page_size != _PAGE_OF_KIND[info.memory]:
        raise RemoteProtocolError(f"{info.page_size}-byte pages for memory of kind {info.memory}")
    if not 1 <= info.vcpus <= info.pages * info.page_size // PAGE_SIZE:
        raise RemoteProtocolError(f"{info.vcpus} vCPUs for {info.pages} pages")


def _no_check(event: Event) -> None:
    pass


# kind number, fields in the dataclass's order, a check of the whole event.
CONTROL: dict[type, tuple[int, tuple[Field, ...], Callable[[Any], None]]] = {
    Challenge: (1, (blob("nonce", NONCE_LEN),), _no_check),
    Hello: (2, (Field("channel", _channel, lambda c: c.value), blob("session"), blob("nonce", NONCE_LEN),
                blob("proof", 32)), _no_check),
    Welcome: (3, (blob("session"), blob("proof")), _no_check),
    GuestInfo: (4, (uint("pages", 1 << 40), uint("vcpus", 257), uint("workload", 4), uint("seed", _U64),
                    uint("zero_permille", 1001), uint("rate"),
                    Field("mode", lambda v, n: Mode(_int(v, n, len(Mode))), int), uint("page_size"),
                    uint("memory", len(_PAGE_OF_KIND))),
                _check_guest_info),
    CpuState: (5, (Field("vcpus", _vcpus, lambda v: [list(s) for s in v]), ), _no_check),
    Round: (6, (uint("number", 1 << 32), uint("pages", 1 << 40), flag("final")), _no_check),
    RoundEnd: (7, (uint("number", 1 << 32),), _no_check),
    RoundAck: (8, (uint("number", 1 << 32),), _no_check),
    Resume: (9, (Field("runs", _runs, _encode_runs), flag("more"), flag("started")), _no_check),
    SourceDone: (10, (uint("pages_sent", 1 << 40),), _no_check),
    DestDone: (11, (Field("counters", _counters),), _no_check),
    Error: (12, (Field("message", _text),), _no_check),
    Running: (13, (), _no_check),
    Downtime: (14, (uint("ns", 1 << 62),), _no_check),
}
_BY_KIND = {kind: cls for cls, (kind, _, _) in CONTROL.items()}
for _cls, (_, _fields, _) in CONTROL.items():  # a description that misses or misorders a field fails at import
    assert [f.name for f in _fields] == [f.name for f in dataclasses.fields(_cls)], _cls


def _decode_control(body: bytes) -> Event:
    try:
        values = msgpack.unpackb(body, use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types for garbage
        raise RemoteProtocolError(f"undecodable control frame ({type(exc).__name__})") from None
    if not isinstance(values, tuple) or not values or not isinstance(values[0], int):
        raise RemoteProtocolError("control frame is not [kind, ...]")
    cls = _BY_KIND.get(values[0])
    if cls is None:
        raise RemoteProtocolError(f"unknown control kind {values[0]}")
    _, fields, check = CONTROL[cls]
    if len(values) - 1 != len(fields):
        raise RemoteProtocolError(f"{cls.__name__} frame has {len(values) - 1} fields, expected {len(fields)}")
    event = cls(*(f.decode(v, f.name) for f, v in zip(fields, values[1:])))
    check(event)
    return event
