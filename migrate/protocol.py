"""The wire protocol, sans-io: bytes in, events out; no sockets, no trio.

A connection starts with a preamble (magic, version) from each side, then
carries frames.  Every frame starts with ``struct wire_frame`` of
``native/wire.h``, the one definition of the wire layout that the native
loops use too; this module reads and writes that struct through cffi and
checks it with the same C function the loops call, so Python and C cannot
drift:

- data frames (page runs, zero runs, discards, page requests) are the struct
  and a raw payload: the hot path's format, spoken by the native loops;
- control frames (handshake, rounds, CPU state, Resume, SourceDone, DestDone,
  Error) are the struct and a msgpack body ``[kind, fields...]``: spoken by
  Python.

Every length read from the wire is bounded before anything is allocated, and
every field is checked for type and range, so a hostile peer gets a
``RemoteProtocolError``, never a crash or an unbounded buffer.

Connections: the *bulk* connection carries the handshake, the CPU state and
the background stream; page requests go on a *requests* connection and their
replies come back on a *replies* connection, so that a fault never waits
behind megabytes of stream and every direction of every connection has one
owner thread (what TLS will need: OpenSSL forbids reading and writing one
connection from two threads at once).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass, field
from typing import Union

import msgpack

from ._native import ffi, lib
from .errors import LocalProtocolError, RemoteProtocolError

MAGIC = b"UFMG"
VERSION = 3  # 3: migration modes (Round, RoundEnd, RoundAck, discards, replace flag)
PAGE_SIZE: int = lib.WIRE_PAGE_SIZE
FRAME_SIZE: int = lib.WIRE_FRAME_SIZE
MAX_RUN_PAGES: int = lib.WIRE_MAX_RUN_PAGES
MAX_REQUEST_RUNS: int = lib.WIRE_MAX_REQUEST_RUNS
# A Resume lists what the destination's kernel still lacks, possibly scattered:
# split into frames of this many runs, which fit a control frame's body.
MAX_RESUME_RUNS = 1024
_PREAMBLE = struct.Struct(">4sH")
_U64 = 1 << 64
_NONCE_LEN = 32
_MAX_TEXT = 1024
# The largest frame each end receives: the destination gets page frames, the
# source only requests and control frames.  A receive buffer holds two, so a
# whole frame always fits behind a partial one.
_LARGEST_TO = {"destination": FRAME_SIZE + MAX_RUN_PAGES * PAGE_SIZE,
               "source": FRAME_SIZE + lib.WIRE_MAX_CONTROL}
# What a receive asks for when no frame length is known yet.
_READ_AHEAD = 64 * 1024


class Role(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class Mode(enum.IntEnum):
    """How the guest's memory moves; the source decides and says so in GuestInfo.

    - postcopy: the guest stops here and resumes there at once; its memory follows.
    - hybrid: precopy rounds while the guest runs here, then postcopy for the
      pages written since the last round (discarded on the destination first).
    - precopy: the same rounds, then the last written pages with the guest
      stopped; the destination resumes it only once every page is there.
    """

    postcopy = 0
    hybrid = 1
    precopy = 2


class Channel(enum.Enum):
    BULK = "bulk"
    REQUESTS = "requests"
    REPLIES = "replies"


class _Sentinel(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = _Sentinel.NEED_DATA
CLOSED = _Sentinel.CLOSED


@dataclass(frozen=True)
class Challenge:
    """Source → destination, first frame of every connection: a fresh nonce to prove the key against."""

    nonce: bytes


@dataclass(frozen=True)
class Hello:
    """Destination → source: which connection this is, the session it joins, and its proof of the key."""

    channel: Channel
    session: bytes
    nonce: bytes
    proof: bytes


@dataclass(frozen=True)
class Welcome:
    """Source → destination: the source's proof of the key, and the session id to join with."""

    session: bytes
    proof: bytes


@dataclass(frozen=True)
class GuestInfo:
    """Source → destination on the bulk connection, once: what guest is coming."""

    pages: int
    vcpus: int
    workload: int
    seed: int
    zero_permille: int
    rate: int
    mode: Mode = Mode.postcopy
    page_size: int = PAGE_SIZE


@dataclass(frozen=True)
class CpuState:
    """Source → destination at switchover: every vCPU's (prng, steps, acc), and when they stopped."""

    vcpus: tuple[tuple[int, int, int], ...]
    stopped_at_ns: int


@dataclass(frozen=True)
class PageRun:
    """``count`` pages from page ``start``; a reply echoes its request's stamp and says how long it was held.

    ``replace``: a precopy round sends the run again; the destination discards
    its older copy first.  ``payload`` is a view into the connection's buffer
    when received: valid until the next ``receive_data``/``receive_buffer`` call.
    """

    start: int
    count: int
    payload: memoryview | bytes = field(repr=False)
    echo: int = 0
    held_ns: int = 0
    replace: bool = False


@dataclass(frozen=True)
class ZeroRun:
    """``count`` all-zero pages from page ``start``: placed with UFFDIO_ZEROPAGE, nothing sent."""

    start: int
    count: int
    echo: int = 0
    held_ns: int = 0
    replace: bool = False


@dataclass(frozen=True)
class Discard:
    """Source → destination at a hybrid switchover: make these pages absent again (they were written since sent)."""

    start: int
    count: int


@dataclass(frozen=True)
class Round:
    """Source → destination: precopy round ``number`` begins, ``pages`` pages (and, if ``final``, the switchover).

    The final round is sent with the guest stopped: its discards (hybrid) or
    its pages (precopy), then the CpuState.
    """

    number: int
    pages: int
    final: bool = False


@dataclass(frozen=True)
class RoundEnd:
    """Source → destination: every frame of round ``number`` has been sent; acknowledge it once placed."""

    number: int


@dataclass(frozen=True)
class RoundAck:
    """Destination → source: every frame before ``RoundEnd(number)`` is placed."""

    number: int


@dataclass(frozen=True)
class PageRequest:
    """Destination → source: runs (start, count) vCPUs wait for; ``stamp`` is the destination's clock."""

    runs: tuple[tuple[int, int], ...]
    stamp: int


@dataclass(frozen=True)
class Resume:
    """Destination → source after a reconnection: runs the kernel still lacks; ``more`` if others follow.

    ``started``: the CpuState had arrived and the vCPUs run here, so the
    switchover is done and must never be repeated (a discard now could drop
    what a vCPU wrote).
    """

    runs: tuple[tuple[int, int], ...]
    more: bool = False
    started: bool = False


@dataclass(frozen=True)
class SourceDone:
    """Source → destination: every page has been streamed once."""

    pages_sent: int


@dataclass(frozen=True)
class DestDone:
    """Destination → source: every page is placed; the destination's counters, for the source's log."""

    counters: dict[str, float]


@dataclass(frozen=True)
class Error:
    """Either way: the sender gives up, and says why."""

    message: str


Event = Union[Challenge, Hello, Welcome, GuestInfo, CpuState, PageRun, ZeroRun, Discard, PageRequest, Round,
              RoundEnd, RoundAck, Resume, SourceDone, DestDone, Error]

# Control kinds: the first element of a control frame's msgpack body.
_KINDS: dict[type, int] = {Challenge: 1, Hello: 2, Welcome: 3, GuestInfo: 4, CpuState: 5, Round: 6, RoundEnd: 7,
                           RoundAck: 8, Resume: 9, SourceDone: 10, DestDone: 11, Error: 12}
# What each role may receive: anything else is a protocol error (data frames
# are checked by the C mask below, the same one the native loops use).
_ACCEPTS = {
    Role.SOURCE: {Hello, RoundAck, Resume, DestDone, Error},
    Role.DESTINATION: {Challenge, Welcome, GuestInfo, CpuState, Round, RoundEnd, SourceDone, Error},
}
_MASK = {Role.SOURCE: lib.WIRE_TO_SOURCE, Role.DESTINATION: lib.WIRE_TO_DESTINATION}
# The handshake each role receives, in this order, before any other control frame
# (an Error may come at any time); once it is over, none of it may come again.
_HANDSHAKE = {Role.DESTINATION: (Challenge, Welcome), Role.SOURCE: (Hello,)}


def prove(key: bytes, role: Role, channel: Channel, source_nonce: bytes, dest_nonce: bytes) -> bytes:
    """HMAC-SHA256 proof that ``role`` knows ``key``, bound to both nonces and the connection.

    The role is part of the message, so one side's proof can never be replayed as the other's.
    """
    msg = b"|".join([b"uffd-migrate", role.value.encode(), channel.value.encode(), source_nonce, dest_nonce])
    return hmac.new(key, msg, hashlib.sha256).digest()


def proof_ok(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison of proofs."""
    return hmac.compare_digest(expected, got)


def _frame(kind: int, count: int, start: int = 0, stamp: int = 0, held_ns: int = 0, flags: int = 0) -> bytes:
    f = ffi.new("struct wire_frame *", {"kind": kind, "count": count, "start": start, "stamp": stamp,
                                        "held_ns": held_ns, "flags": flags})
    return bytes(ffi.buffer(f))


class Connection:
    """One side of one connection.

    The receive buffer is C memory (an ``rxbuf_t``): the native loop that owns
    this connection's receiving direction after the handshake reads on from
    where this object stopped, and hands it back the same way.

    Args:
        role: which side we are; decides which events we accept and the buffer's size.
        guest_pages: the guest's size in pages, when known; otherwise learnt
            from the GuestInfo that passes.  Page indexes are checked against it.
    """

    def __init__(self, role: Role, guest_pages: int | None = None) -> None:
        self.role = role
        self.guest_pages = guest_pages
        self._sent_preamble = False
        self._got_preamble = False
        self._eof = False
        self._described = False  # GuestInfo is accepted once: it sets the bound every page index is checked against
        self._step = 0  # handshake frames received so far (see _HANDSHAKE)
        self._error: RemoteProtocolError | None = None  # set once the peer broke the protocol: ERROR
        cap = 2 * _LARGEST_TO[role.value]
        self._data = ffi.new("uint8_t[]", cap)
        self.rx = ffi.new("rxbuf_t *", {"data": self._data, "cap": cap})
        self._why = ffi.new("char **")

    # -- sending -----------------------------------------------------------
    def preamble(self) -> bytes:
        """The preamble, now rather than with the first event (``b""`` once sent).

        A destination says it first: a TLS source then tells a plaintext
        client from a TLS one by its first bytes, and answers it in words.
        """
        if self._sent_preamble:
            return b""
        self._sent_preamble = True
        return _PREAMBLE.pack(MAGIC, VERSION)

    def send(self, event: Event) -> list[bytes | memoryview]:
        """Encodes ``event``: the chunks to write, in order (a page run's payload is not copied)."""
        chunks: list[bytes | memoryview] = []
        if not self._sent_preamble:
            chunks.append(_PREAMBLE.pack(MAGIC, VERSION))
            self._sent_preamble = True
        if isinstance(event, PageRun):
            if len(event.payload) != event.count * PAGE_SIZE or not 0 < event.count <= MAX_RUN_PAGES:
                raise LocalProtocolError(f"page run of {event.count} pages with {len(event.payload)} bytes")
            chunks += [_frame(lib.WIRE_PAGES, event.count, event.start, event.echo, event.held_ns,
                              lib.WIRE_REPLACE if event.replace else 0), event.payload]
        elif isinstance(event, ZeroRun):
            chunks.append(_frame(lib.WIRE_ZEROS, event.count, event.start, event.echo, event.held_ns,
                                 lib.WIRE_REPLACE if event.replace else 0))
        elif isinstance(event, Discard):
            chunks.append(_frame(lib.WIRE_DISCARD, event.count, event.start))
        elif isinstance(event, PageRequest):
            if not 0 < len(event.runs) <= MAX_REQUEST_RUNS:
                raise LocalProtocolError(f"{len(event.runs)} runs in one request; split it")
            runs = ffi.new("struct wire_run[]", [{"start": s, "count": n} for s, n in event.runs])
            chunks += [_frame(lib.WIRE_REQUEST, len(event.runs), stamp=event.stamp), bytes(ffi.buffer(runs))]
        else:
            if isinstance(event, GuestInfo):
                self.guest_pages = event.pages
            body = msgpack.packb([_KINDS[type(event)], *_encode_fields(event)])
            if len(body) > lib.WIRE_MAX_CONTROL:
                raise LocalProtocolError(f"{type(event).__name__} of {len(body)} bytes is too large")
            chunks += [_frame(lib.WIRE_CONTROL, len(body)), body]
        return chunks

    # -- receiving ---------------------------------------------------------
    def _view(self, start: int, length: int) -> memoryview:
        return memoryview(ffi.buffer(self._data + start, length))

    def receive_data(self, data: bytes) -> None:
        """Feeds bytes from the peer; ``b""`` means the peer closed."""
        if not data:
            self._eof = True
            return
        with self.receive_buffer(len(data)) as view:
            view[: len(data)] = data
        self.commit(len(data))

    def receive_buffer(self, min_size: int = 1) -> memoryview:
        """Free space to ``recv_into`` directly (no copy); report what was written with ``commit``.

        Once a frame's length is known the view ends with that frame, so a
        large frame is read in place and the buffer is usually empty again
        after it.  Invalidates payload views of events returned before.
        """
        start, length = self._reserve(min_size)
        return self._view(start, length)

    def receive_space(self, min_size: int = 1) -> tuple[object, int]:
        """The same space as ``receive_buffer``, as a C pointer and a length (for ``link_recv``)."""
        start, length = self._reserve(min_size)
        return self._data + start, length

    def _reserve(self, min_size: int) -> tuple[int, int]:
        rx = self.rx
        if rx.start == rx.end:
            rx.start = rx.end = 0
        want = max(min_size, self._rest_of_frame() or _READ_AHEAD)
        if rx.cap - rx.end < want:
            ffi.memmove(self._data, self._data + rx.start, rx.end - rx.start)
            rx.end -= rx.start
            rx.start = 0
        if rx.cap - rx.end < min_size:
            raise RemoteProtocolError("receive buffer full: the peer sent more than one frame can hold")
        return rx.end, min(want, rx.cap - rx.end)

    def _rest_of_frame(self) -> int:
        """Bytes still missing from the frame being received, when its header is in; else 0."""
        rx = self.rx
        start = rx.start + (0 if self._got_preamble else _PREAMBLE.size)
        if rx.end - start < FRAME_SIZE:
            return 0
        plen = lib.wire_check(ffi.cast("struct wire_frame *", self._data + start), self.guest_pages or 0,
                              _MASK[self.role], self._why)
        return max(0, start + FRAME_SIZE + max(plen, 0) - rx.end)

    def commit(self, n: int) -> None:
        """Records ``n`` bytes written into the view from ``receive_buffer``; 0 means the peer closed."""
        if n == 0:
            self._eof = True
        self.rx.end += n

    def next_event(self) -> Event | _Sentinel:
        """The next complete event, ``NEED_DATA``, or ``CLOSED`` once the peer closed cleanly.

        Raises:
            RemoteProtocolError: malformed, oversized, unexpected, out-of-order or
                out-of-range input.  The connection is then in ERROR for good: every
                later call raises the same error (nothing after a violation is trusted).
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event | _Sentinel:
        rx = self.rx
        if not self._got_preamble:
            if rx.end - rx.start < _PREAMBLE.size:
                return self._need_data()
            magic, version = _PREAMBLE.unpack(self._view(rx.start, _PREAMBLE.size))
            if magic[:1] == b"\x16":  # a TLS handshake record
                raise RemoteProtocolError("the peer speaks TLS and this end does not (bad magic)",
                                          hint="give both sides --tls-cert, --tls-key and --tls-ca, or neither")
            if magic != MAGIC:
                raise RemoteProtocolError("the peer is not a uffd-migrate process (bad magic)",
                                          hint="check the host and port")
            if version != VERSION:
                raise RemoteProtocolError(f"the peer speaks protocol version {version}, we speak {VERSION}",
                                          hint="run the same uffd-migrate version on both hosts")
            self._got_preamble = True
            rx.start += _PREAMBLE.size
        if rx.end - rx.start < FRAME_SIZE:
            return self._need_data()
        f = ffi.new("struct wire_frame *")
        ffi.memmove(f, self._data + rx.start, FRAME_SIZE)
        plen = lib.wire_check(f, self.guest_pages or 0, _MASK[self.role], self._why)
        if plen < 0:
            raise RemoteProtocolError(ffi.string(self._why[0]).decode())
        if rx.end - rx.start < FRAME_SIZE + plen:
            return self._need_data()
        payload = self._view(rx.start + FRAME_SIZE, plen)
        replace = bool(f.flags & lib.WIRE_REPLACE)
        if f.kind == lib.WIRE_PAGES:
            event: Event = PageRun(f.start, f.count, payload, f.stamp, f.held_ns, replace)
        elif f.kind == lib.WIRE_ZEROS:
            event = ZeroRun(f.start, f.count, f.stamp, f.held_ns, replace)
        elif f.kind == lib.WIRE_DISCARD:
            event = Discard(f.start, f.count)
        elif f.kind == lib.WIRE_REQUEST:
            event = self._decode_request(f, payload)
        else:
            event = self._decode_control(bytes(payload))
        rx.start += FRAME_SIZE + plen
        return event

    def _need_data(self) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if self.rx.end > self.rx.start:
            raise RemoteProtocolError("the peer closed the connection in the middle of a frame")
        return CLOSED

    def _decode_request(self, f: object, payload: memoryview) -> PageRequest:
        runs = ffi.new("struct wire_run[]", f.count)  # type: ignore[attr-defined]
        ffi.memmove(runs, payload, len(payload))
        if lib.wire_check_runs(runs, f.count, self.guest_pages or 0, self._why) < 0:  # type: ignore[attr-defined]
            raise RemoteProtocolError(ffi.string(self._why[0]).decode())
        return PageRequest(tuple((r.start, r.count) for r in runs), f.stamp)  # type: ignore[attr-defined]

    def _decode_control(self, body: bytes) -> Event:
        try:
            fields = msgpack.unpackb(body, use_list=False, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises a zoo of types for garbage
            raise RemoteProtocolError(f"undecodable control frame ({type(exc).__name__})") from None
        if not isinstance(fields, tuple) or not fields or not isinstance(fields[0], int):
            raise RemoteProtocolError("control frame is not [kind, ...]")
        cls = _BY_KIND.get(fields[0])
        if cls is None:
            raise RemoteProtocolError(f"unknown control kind {fields[0]}")
        if cls not in _ACCEPTS[self.role]:
            raise RemoteProtocolError(f"unexpected {cls.__name__} frame for the {self.role.value}")
        steps = _HANDSHAKE[self.role]
        if cls is not Error and self._step < len(steps):
            if cls is not steps[self._step]:
                raise RemoteProtocolError(f"{cls.__name__} before the handshake's {steps[self._step].__name__}")
            self._step += 1
        elif cls in steps:
            raise RemoteProtocolError(f"a second {cls.__name__}: the handshake is over")
        event = _DECODERS[cls](fields[1:])
        if isinstance(event, GuestInfo):
            if self._described:
                raise RemoteProtocolError("a second GuestInfo: the guest was already described")
            self._described = True
            self.guest_pages = event.pages
        if isinstance(event, Resume):
            if self.guest_pages is None:
                raise RemoteProtocolError("Resume before the guest was described")
            for start, count in event.runs:
                if count < 1 or start + count > self.guest_pages:
                    raise RemoteProtocolError(f"pages {start}+{count} are outside the guest of "
                                              f"{self.guest_pages} pages")
            # One frame never needs more than the whole guest: more is a peer making us send without end.
            total = sum(count for _, count in event.runs)
            if total > self.guest_pages:
                raise RemoteProtocolError(f"Resume names {total} pages, more than the guest's {self.guest_pages}")
        return event


def _encode_fields(event: Event) -> list[object]:
    if isinstance(event, Hello):
        return [event.channel.value, event.session, event.nonce, event.proof]
    if isinstance(event, CpuState):
        return [[list(v) for v in event.vcpus], event.stopped_at_ns]
    if isinstance(event, Resume):
        if len(event.runs) > MAX_RESUME_RUNS:
            raise LocalProtocolError(f"{len(event.runs)} runs in one Resume; split it")
        return [[list(r) for r in event.runs], event.more, event.started]
    if isinstance(event, GuestInfo):
        return [event.pages, event.vcpus, event.workload, event.seed, event.zero_permille, event.rate,
                int(event.mode), event.page_size]
    return list(vars(event).values())


# -- field checks: each returns the value or raises RemoteProtocolError --------
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


def _arity(f: tuple, n: int, what: str) -> tuple:
    if len(f) != n:
        raise RemoteProtocolError(f"{what} frame has {len(f)} fields, expected {n}")
    return f


def _runs(v: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, tuple) or len(v) > MAX_RESUME_RUNS:
        raise RemoteProtocolError(f"page runs must be a list of at most {MAX_RESUME_RUNS} [start, count]")
    out = []
    for r in v:
        if not isinstance(r, tuple) or len(r) != 2:
            raise RemoteProtocolError("a page run is not [start, count]")
        out.append((_int(r[0], "start", 1 << 40), _int(r[1], "count", 1 << 40)))
    return tuple(out)


def _dec_cpu_state(f: tuple) -> CpuState:
    vcpus, stopped = _arity(f, 2, "CpuState")
    if not isinstance(vcpus, tuple) or not 0 < len(vcpus) <= 256:
        raise RemoteProtocolError("CPU state must list 1..256 vCPUs")
    states = []
    for v in vcpus:
        if not isinstance(v, tuple) or len(v) != 3:
            raise RemoteProtocolError("a vCPU state is not [prng, steps, acc]")
        states.append((_int(v[0], "prng", _U64), _int(v[1], "steps", _U64), _int(v[2], "acc", _U64)))
    return CpuState(tuple(states), _int(stopped, "stopped_at_ns"))


def _dec_hello(f: tuple) -> Hello:
    channel, session, nonce, proof = _arity(f, 4, "Hello")
    try:
        ch = Channel(channel)
    except ValueError:
        raise RemoteProtocolError(f"unknown channel {channel!r}") from None
    return Hello(ch, _bytes(session, "session", hi=32), _bytes(nonce, "nonce", _NONCE_LEN),
                 _bytes(proof, "proof", 32))


def _dec_guest_info(f: tuple) -> GuestInfo:
    pages, vcpus, workload, seed, zero, rate, mode, page_size = _arity(f, 8, "GuestInfo")
    info = GuestInfo(_int(pages, "pages", 1 << 40), _int(vcpus, "vcpus", 257), _int(workload, "workload", 4),
                     _int(seed, "seed", _U64), _int(zero, "zero_permille", 1001), _int(rate, "rate"),
                     Mode(_int(mode, "mode", len(Mode))), _int(page_size, "page_size"))
    if info.page_size != PAGE_SIZE:
        raise RemoteProtocolError(f"the source uses {info.page_size}-byte pages, we use {PAGE_SIZE}")
    if not 1 <= info.vcpus <= info.pages:
        raise RemoteProtocolError(f"{info.vcpus} vCPUs for {info.pages} pages")
    return info


def _dec_counters(f: tuple) -> DestDone:
    (counters,) = _arity(f, 1, "DestDone")
    if not isinstance(counters, dict) or len(counters) > 64 or not all(
            isinstance(k, str) and len(k) <= 64 and type(v) in (int, float, bool) for k, v in counters.items()):
        raise RemoteProtocolError("DestDone counters must be a small map of names to numbers")
    return DestDone(counters)


_DECODERS = {
    Challenge: lambda f: Challenge(_bytes(_arity(f, 1, "Challenge")[0], "nonce", _NONCE_LEN)),
    Hello: _dec_hello,
    Welcome: lambda f: Welcome(*(_bytes(v, n, hi=32) for v, n in zip(_arity(f, 2, "Welcome"), ("session", "proof")))),
    GuestInfo: _dec_guest_info,
    CpuState: _dec_cpu_state,
    Round: lambda f: Round(_int(_arity(f, 3, "Round")[0], "number", 1 << 32), _int(f[1], "pages", 1 << 40),
                           _bool(f[2], "final")),
    RoundEnd: lambda f: RoundEnd(_int(_arity(f, 1, "RoundEnd")[0], "number", 1 << 32)),
    RoundAck: lambda f: RoundAck(_int(_arity(f, 1, "RoundAck")[0], "number", 1 << 32)),
    Resume: lambda f: Resume(_runs(_arity(f, 3, "Resume")[0]), _bool(f[1], "more"), _bool(f[2], "started")),
    SourceDone: lambda f: SourceDone(_int(_arity(f, 1, "SourceDone")[0], "pages_sent", 1 << 40)),
    DestDone: _dec_counters,
    Error: lambda f: Error(_text(_arity(f, 1, "Error")[0], "message")),
}
_BY_KIND = {kind: cls for cls, kind in _KINDS.items()}


def new_nonce() -> bytes:
    """A fresh random nonce for a challenge or a hello."""
    return secrets.token_bytes(_NONCE_LEN)
