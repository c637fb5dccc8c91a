"""The wire protocol, sans-io: bytes in, events out; no sockets, no trio.

A connection starts with a preamble (magic, version) from each side, then
carries frames::

    u32 header length | u32 payload length | msgpack header | raw payload

The header is a msgpack array ``[kind, fields...]``; only page runs have a
payload (the pages themselves, never re-encoded).  Every length read from the
wire is bounded before anything is allocated, and every field is checked for
type and range, so a hostile peer gets a ``RemoteProtocolError``, never a
crash or an unbounded buffer.

Channels: the *bulk* channel carries the handshake, the CPU state and the
background stream; the *urgent* channel carries page requests and their
replies, so that a fault never waits behind megabytes of stream.
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

from .errors import LocalProtocolError, RemoteProtocolError

MAGIC = b"UFMG"
VERSION = 1
PAGE_SIZE = 4096
_PREAMBLE = struct.Struct(">4sH")
_PREFIX = struct.Struct(">II")
# A header is a few integers, or a page request of up to MAX_REQUEST_RUNS runs:
# 64 KiB holds either with room to spare and bounds what a peer can make us buffer.
MAX_HEADER = 64 * 1024
MAX_REQUEST_RUNS = 1024
# Payload bound: the largest page run we send or accept.  Large enough to place
# a whole 1 MiB run with one ioctl, small enough that a buffer holding two
# frames stays a few MiB per connection.
DEFAULT_MAX_PAYLOAD = 1 << 20
# What a receive asks for when no frame length is known yet: small frames
# (requests, zero runs) come many to a read, a large one's prefix is learnt.
_READ_AHEAD = 64 * 1024
_U64 = 1 << 64
_NONCE_LEN = 32
_MAX_TEXT = 1024


class Role(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class Channel(enum.Enum):
    BULK = "bulk"
    URGENT = "urgent"


class _Sentinel(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = _Sentinel.NEED_DATA
CLOSED = _Sentinel.CLOSED


@dataclass(frozen=True)
class Challenge:
    """Source → destination, first frame of every channel: a fresh nonce to prove the key against."""

    nonce: bytes


@dataclass(frozen=True)
class Hello:
    """Destination → source: which channel this is, the session it joins, and its proof of the key."""

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
    """Source → destination on the bulk channel: what guest is coming."""

    pages: int
    vcpus: int
    workload: int
    seed: int
    zero_permille: int
    rate: int
    page_size: int = PAGE_SIZE


@dataclass(frozen=True)
class CpuState:
    """Source → destination at switchover: every vCPU's (prng, steps, acc), and when they stopped."""

    vcpus: tuple[tuple[int, int, int], ...]
    stopped_at_ns: int


@dataclass(frozen=True)
class PageRun:
    """``count`` pages from page ``start``.  ``echo`` returns a request's stamp (0 in the stream).

    ``payload`` is a view into the connection's buffer when received: valid
    until the next ``receive_data``/``receive_buffer`` call.
    """

    start: int
    count: int
    payload: memoryview | bytes = field(repr=False)
    echo: int = 0


@dataclass(frozen=True)
class ZeroRun:
    """``count`` all-zero pages from page ``start``: placed with UFFDIO_ZEROPAGE, nothing sent."""

    start: int
    count: int
    echo: int = 0


@dataclass(frozen=True)
class PageRequest:
    """Destination → source on the urgent channel: runs (start, count) a vCPU is waiting for."""

    runs: tuple[tuple[int, int], ...]
    stamp: int


@dataclass(frozen=True)
class Resume:
    """Destination → source after a reconnection: runs the kernel still lacks; ``more`` if others follow."""

    runs: tuple[tuple[int, int], ...]
    more: bool = False


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


Event = Union[Challenge, Hello, Welcome, GuestInfo, CpuState, PageRun, ZeroRun, PageRequest, Resume,
              SourceDone, DestDone, Error]

_KINDS: dict[type, int] = {Challenge: 1, Hello: 2, Welcome: 3, GuestInfo: 4, CpuState: 5, PageRun: 6,
                           ZeroRun: 7, PageRequest: 8, Resume: 9, SourceDone: 10, DestDone: 11, Error: 12}
# What each role may receive: anything else is a protocol error.
_ACCEPTS = {
    Role.SOURCE: {Hello, PageRequest, Resume, DestDone, Error},
    Role.DESTINATION: {Challenge, Welcome, GuestInfo, CpuState, PageRun, ZeroRun, SourceDone, Error},
}


def prove(key: bytes, role: Role, channel: Channel, source_nonce: bytes, dest_nonce: bytes) -> bytes:
    """HMAC-SHA256 proof that ``role`` knows ``key``, bound to both nonces and the channel.

    The role is part of the message, so one side's proof can never be replayed as the other's.
    """
    msg = b"|".join([b"uffd-migrate", role.value.encode(), channel.value.encode(), source_nonce, dest_nonce])
    return hmac.new(key, msg, hashlib.sha256).digest()


def proof_ok(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison of proofs."""
    return hmac.compare_digest(expected, got)


class Connection:
    """One side of one channel.

    Args:
        role: which side we are; decides which events we accept.
        max_payload: largest page-run payload accepted, in bytes.  It sizes the
            receive buffer: the source, which receives no pages, passes 0 and
            holds ~128 KiB per connection instead of ~2.1 MiB.  What we send is
            bounded by DEFAULT_MAX_PAYLOAD, what every peer accepts.
        guest_pages: the guest's size in pages, when known; otherwise learnt
            from the GuestInfo that passes.  Page indexes are checked against it.
    """

    def __init__(self, role: Role, max_payload: int = DEFAULT_MAX_PAYLOAD, guest_pages: int | None = None) -> None:
        self.role = role
        self.max_payload = max_payload
        self.guest_pages = guest_pages
        self._sent_preamble = False
        self._got_preamble = False
        self._eof = False
        # Two maximal frames: a full frame can always sit behind a partial one.
        self._buf = bytearray(2 * (_PREFIX.size + MAX_HEADER + max_payload))
        self._start = 0
        self._end = 0

    # -- sending -----------------------------------------------------------
    def send(self, event: Event) -> list[bytes | memoryview]:
        """Encodes ``event``: the chunks to write, in order (a page run's payload is not copied)."""
        payload: bytes | memoryview = b""
        if isinstance(event, PageRun):
            payload = event.payload
            if len(payload) != event.count * PAGE_SIZE or len(payload) > DEFAULT_MAX_PAYLOAD:
                raise LocalProtocolError(f"page run of {event.count} pages with {len(payload)} bytes")
        if isinstance(event, GuestInfo):
            self.guest_pages = event.pages
        header = msgpack.packb([_KINDS[type(event)], *_encode_fields(event)])
        if len(header) > MAX_HEADER:
            raise LocalProtocolError(f"{type(event).__name__} header of {len(header)} bytes is too large")
        chunks: list[bytes | memoryview] = []
        if not self._sent_preamble:
            chunks.append(_PREAMBLE.pack(MAGIC, VERSION))
            self._sent_preamble = True
        chunks.append(_PREFIX.pack(len(header), len(payload)) + header)
        if payload:
            chunks.append(payload)
        return chunks

    # -- receiving ---------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feeds bytes from the peer; ``b""`` means the peer closed."""
        if not data:
            self._eof = True
            return
        view = self.receive_buffer(len(data))
        view[: len(data)] = data
        self.commit(len(data))

    def receive_buffer(self, min_size: int = 1) -> memoryview:
        """Free space to ``recv_into`` directly (no copy); report what was written with ``commit``.

        Once a frame's length is known the view ends with that frame, so a
        large frame is read in place and the buffer is usually empty again
        after it: unconsumed bytes rarely need moving.  Invalidates payload
        views of events returned before.
        """
        if self._start == self._end:
            self._start = self._end = 0
        want = max(min_size, self._rest_of_frame() or _READ_AHEAD)
        if len(self._buf) - self._end < want:
            pending = bytes(self._buf[self._start : self._end])
            self._buf[: len(pending)] = pending
            self._start, self._end = 0, len(pending)
        if len(self._buf) - self._end < min_size:
            raise RemoteProtocolError("receive buffer full: the peer sent more than one frame can hold")
        return memoryview(self._buf)[self._end : self._end + want]

    def _rest_of_frame(self) -> int:
        """Bytes still missing from the frame being received, when its prefix is in; else 0."""
        start = self._start + (0 if self._got_preamble else _PREAMBLE.size)
        if self._end - start < _PREFIX.size:
            return 0
        hlen, plen = _PREFIX.unpack_from(self._buf, start)
        return max(0, start + _PREFIX.size + min(hlen, MAX_HEADER) + min(plen, self.max_payload) - self._end)

    def commit(self, n: int) -> None:
        """Records ``n`` bytes written into the view from ``receive_buffer``; 0 means the peer closed."""
        if n == 0:
            self._eof = True
        self._end += n

    def next_event(self) -> Event | _Sentinel:
        """The next complete event, ``NEED_DATA``, or ``CLOSED`` once the peer closed cleanly.

        Raises:
            RemoteProtocolError: malformed, oversized, unexpected or out-of-range input.
        """
        avail = self._end - self._start
        if not self._got_preamble:
            if avail < _PREAMBLE.size:
                return self._need_data(avail)
            magic, version = _PREAMBLE.unpack_from(self._buf, self._start)
            if magic != MAGIC:
                raise RemoteProtocolError("the peer is not a uffd-migrate process (bad magic)",
                                          hint="check the host and port")
            if version != VERSION:
                raise RemoteProtocolError(f"the peer speaks protocol version {version}, we speak {VERSION}",
                                          hint="run the same uffd-migrate version on both hosts")
            self._got_preamble = True
            self._start += _PREAMBLE.size
            avail -= _PREAMBLE.size
        if avail < _PREFIX.size:
            return self._need_data(avail)
        hlen, plen = _PREFIX.unpack_from(self._buf, self._start)
        if not 0 < hlen <= MAX_HEADER:
            raise RemoteProtocolError(f"frame header length {hlen} outside 1..{MAX_HEADER}")
        if plen > self.max_payload:
            raise RemoteProtocolError(f"frame payload length {plen} exceeds the limit {self.max_payload}")
        total = _PREFIX.size + hlen + plen
        if avail < total:
            return self._need_data(avail)
        hstart = self._start + _PREFIX.size
        event = self._decode(bytes(self._buf[hstart : hstart + hlen]),
                             memoryview(self._buf)[hstart + hlen : hstart + hlen + plen])
        self._start += total
        return event

    def _need_data(self, avail: int) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if avail:
            raise RemoteProtocolError("the peer closed the connection in the middle of a frame")
        return CLOSED

    def _decode(self, header: bytes, payload: memoryview) -> Event:
        try:
            fields = msgpack.unpackb(header, use_list=False, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises a zoo of types for garbage
            raise RemoteProtocolError(f"undecodable frame header ({type(exc).__name__})") from None
        if not isinstance(fields, tuple) or not fields or not isinstance(fields[0], int):
            raise RemoteProtocolError("frame header is not [kind, ...]")
        cls = _BY_KIND.get(fields[0])
        if cls is None:
            raise RemoteProtocolError(f"unknown frame kind {fields[0]}")
        if cls not in _ACCEPTS[self.role]:
            raise RemoteProtocolError(f"unexpected {cls.__name__} frame for the {self.role.value}")
        if cls is not PageRun and len(payload):
            raise RemoteProtocolError(f"{cls.__name__} frame with a payload")
        event = _DECODERS[cls](fields[1:], payload)
        self._check_range(event)
        if isinstance(event, GuestInfo):
            self.guest_pages = event.pages
        return event

    def _check_range(self, event: Event) -> None:
        if isinstance(event, (PageRun, ZeroRun)):
            runs: tuple[tuple[int, int], ...] = ((event.start, event.count),)
        elif isinstance(event, (PageRequest, Resume)):
            runs = event.runs
        else:
            return
        if self.guest_pages is None:
            raise RemoteProtocolError(f"{type(event).__name__} before the guest was described")
        for start, count in runs:
            if count < 1 or start + count > self.guest_pages:
                raise RemoteProtocolError(f"pages {start}+{count} are outside the guest of {self.guest_pages} pages")
        # One frame never needs more than the whole guest: more is a peer making us read and send without end.
        total = sum(count for _, count in runs)
        if total > self.guest_pages:
            raise RemoteProtocolError(f"{type(event).__name__} names {total} pages, more than the guest's "
                                      f"{self.guest_pages}")


def _encode_fields(event: Event) -> list[object]:
    if isinstance(event, Hello):
        return [event.channel.value, event.session, event.nonce, event.proof]
    if isinstance(event, PageRun):
        return [event.start, event.count, event.echo]
    if isinstance(event, CpuState):
        return [[list(v) for v in event.vcpus], event.stopped_at_ns]
    if isinstance(event, (PageRequest, Resume)):
        runs = [list(r) for r in event.runs]
        if len(runs) > MAX_REQUEST_RUNS:
            raise LocalProtocolError(f"{len(runs)} runs in one request; split it")
        return [runs, event.stamp] if isinstance(event, PageRequest) else [runs, event.more]
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


def _runs(v: object, least: int = 1) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, tuple) or not least <= len(v) <= MAX_REQUEST_RUNS:
        raise RemoteProtocolError(f"page runs must be a list of 1..{MAX_REQUEST_RUNS} [start, count]")
    out = []
    for r in v:
        if not isinstance(r, tuple) or len(r) != 2:
            raise RemoteProtocolError("a page run is not [start, count]")
        out.append((_int(r[0], "start", 1 << 40), _int(r[1], "count", 1 << 40)))
    return tuple(out)


def _dec_page_run(f: tuple, payload: memoryview) -> PageRun:
    start, count, echo = _arity(f, 3, "PageRun")
    count = _int(count, "count", 1 << 40)
    if len(payload) != count * PAGE_SIZE:
        raise RemoteProtocolError(f"page run of {count} pages carries {len(payload)} bytes")
    return PageRun(_int(start, "start", 1 << 40), count, payload, _int(echo, "echo"))


def _dec_cpu_state(f: tuple, _: memoryview) -> CpuState:
    vcpus, stopped = _arity(f, 2, "CpuState")
    if not isinstance(vcpus, tuple) or not 0 < len(vcpus) <= 256:
        raise RemoteProtocolError("CPU state must list 1..256 vCPUs")
    states = []
    for v in vcpus:
        if not isinstance(v, tuple) or len(v) != 3:
            raise RemoteProtocolError("a vCPU state is not [prng, steps, acc]")
        states.append((_int(v[0], "prng", _U64), _int(v[1], "steps", _U64), _int(v[2], "acc", _U64)))
    return CpuState(tuple(states), _int(stopped, "stopped_at_ns"))


def _dec_hello(f: tuple, _: memoryview) -> Hello:
    channel, session, nonce, proof = _arity(f, 4, "Hello")
    try:
        ch = Channel(channel)
    except ValueError:
        raise RemoteProtocolError(f"unknown channel {channel!r}") from None
    return Hello(ch, _bytes(session, "session", hi=32), _bytes(nonce, "nonce", _NONCE_LEN),
                 _bytes(proof, "proof", 32))


def _dec_guest_info(f: tuple, _: memoryview) -> GuestInfo:
    pages, vcpus, workload, seed, zero, rate, page_size = _arity(f, 7, "GuestInfo")
    info = GuestInfo(_int(pages, "pages", 1 << 40), _int(vcpus, "vcpus", 257), _int(workload, "workload", 4),
                     _int(seed, "seed", _U64), _int(zero, "zero_permille", 1001), _int(rate, "rate"),
                     _int(page_size, "page_size"))
    if info.page_size != PAGE_SIZE:
        raise RemoteProtocolError(f"the source uses {info.page_size}-byte pages, we use {PAGE_SIZE}")
    if not 1 <= info.vcpus <= info.pages:
        raise RemoteProtocolError(f"{info.vcpus} vCPUs for {info.pages} pages")
    return info


def _dec_counters(f: tuple, _: memoryview) -> DestDone:
    (counters,) = _arity(f, 1, "DestDone")
    if not isinstance(counters, dict) or len(counters) > 64 or not all(
            isinstance(k, str) and len(k) <= 64 and type(v) in (int, float, bool) for k, v in counters.items()):
        raise RemoteProtocolError("DestDone counters must be a small map of names to numbers")
    return DestDone(counters)


_DECODERS = {
    Challenge: lambda f, _: Challenge(_bytes(_arity(f, 1, "Challenge")[0], "nonce", _NONCE_LEN)),
    Hello: _dec_hello,
    Welcome: lambda f, _: Welcome(*(_bytes(v, n, hi=32) for v, n in zip(_arity(f, 2, "Welcome"),
                                                                         ("session", "proof")))),
    GuestInfo: _dec_guest_info,
    CpuState: _dec_cpu_state,
    PageRun: _dec_page_run,
    ZeroRun: lambda f, _: ZeroRun(*(_int(v, n, hi) for v, n, hi in zip(_arity(f, 3, "ZeroRun"), ("start", "count", "echo"),
                                                                        (1 << 40, 1 << 40, 1 << 63)))),
    PageRequest: lambda f, _: PageRequest(_runs(_arity(f, 2, "PageRequest")[0]), _int(f[1], "stamp")),
    Resume: lambda f, _: Resume(_runs(_arity(f, 2, "Resume")[0], least=0), _bool(f[1], "more")),
    SourceDone: lambda f, _: SourceDone(_int(_arity(f, 1, "SourceDone")[0], "pages_sent", 1 << 40)),
    DestDone: _dec_counters,
    Error: lambda f, _: Error(_text(_arity(f, 1, "Error")[0], "message")),
}
_BY_KIND = {kind: cls for cls, kind in _KINDS.items()}


def new_nonce() -> bytes:
    """A fresh random nonce for a challenge or a hello."""
    return secrets.token_bytes(_NONCE_LEN)
