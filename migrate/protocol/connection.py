"""One side of one connection, sans-io: bytes in, events out; no sockets, no trio.

A connection starts with a preamble (magic, version) from each side, then
carries frames (``codec.py``) in the order ``state.py`` allows.  Every length
read from the wire is bounded before anything is allocated.
"""

from __future__ import annotations

import enum
import errno

from .._native import ffi, lib
from ..errors import LocalProtocolError, ProtocolViolation, RemoteProtocolError
from . import codec
from .codec import FRAME_SIZE, PREAMBLE
from .events import DATA_EVENTS, MAX_PAYLOAD, Event, GuestInfo, Role
from .state import Conversation, State

# The largest frame each end receives: the destination gets page frames, the
# source only requests and control frames.  A receive buffer holds two, so a
# whole frame always fits behind a partial one.
_LARGEST_TO = {Role.DESTINATION: FRAME_SIZE + MAX_PAYLOAD, Role.SOURCE: FRAME_SIZE + codec.MAX_CONTROL}
# What a receive asks for when no frame length is known yet.
_READ_AHEAD = 64 * 1024


class _Sentinel(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = _Sentinel.NEED_DATA
CLOSED = _Sentinel.CLOSED


class Connection:
    """One side of one connection.

    The receive buffer is C memory (an ``rxbuf_t``): the native loop that owns
    this connection's receiving direction after the handshake reads on from
    where this object stopped, and hands it back the same way; it reads only
    the frames ``accepts`` allows, which the state decides.

    Args:
        role: which side we are; decides what we may send and receive, and the buffer's size.
        guest: the guest, when known before this connection (the source's own;
            a later connection of the destination's session); otherwise learnt
            from the GuestInfo that passes.  Page indexes are checked against it.
    """

    def __init__(self, role: Role, guest: GuestInfo | None = None) -> None:
        self.role = role
        self.conversation = Conversation(role, guest)
        self._sent_preamble = False
        self._got_preamble = False
        self._eof = False
        self._error: RemoteProtocolError | None = None  # set once the peer broke the protocol: ERROR
        cap = 2 * _LARGEST_TO[role]
        self._data = ffi.new("uint8_t[]", cap)
        self.rx = ffi.new("rxbuf_t *", {"data": self._data, "cap": cap})
        self._why = ffi.new("char **")
        # The header wire_check reads, copied out of the buffer: there it follows the 6-byte preamble
        # and frames of any length, and C reads a struct wire_frame only where it is 8-byte aligned.
        self._header = ffi.new("struct wire_frame *")
        self._outgoing = ffi.new("struct wire_frame *")

    @property
    def state(self) -> State:
        return self.conversation.state

    @property
    def accepts(self) -> int:
        """The frame kinds the peer may send now: the mask a native loop reading this connection checks."""
        return self.conversation.accepts

    # -- sending -----------------------------------------------------------
    def preamble(self) -> bytes:
        """The preamble, now rather than with the first event (``b""`` once sent).

        A destination says it first: a TLS source then tells a plaintext
        client from a TLS one by its first bytes, and answers it in words.
        """
        if self._sent_preamble:
            return b""
        self._sent_preamble = True
        return codec.preamble()

    def send(self, event: Event) -> list[bytes | memoryview]:
        """Encodes ``event``: the chunks to write, in order (a page run's payload is not copied).

        Raises:
            LocalProtocolError: the event may not go now, or breaks a bound of the wire.
        """
        chunks = codec.encode(event, self.conversation.page_size)
        if isinstance(event, DATA_EVENTS):  # the check the peer's loop will make, made first
            ffi.memmove(self._outgoing, chunks[0], FRAME_SIZE)  # aligned, as _header
            if lib.wire_check(self._outgoing, self.conversation.guest_pages, self.conversation.page_shift,
                              self.conversation.mask(self.role), self._why) < 0:
                raise LocalProtocolError(ffi.string(self._why[0]).decode())
        self.conversation.sent(event)
        pre = self.preamble()
        return [pre, *chunks] if pre else chunks

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

    def _check(self, at: int) -> int:
        """``wire_check`` of the header at ``at``: the payload's length, -ENOMSG or -EBADMSG."""
        ffi.memmove(self._header, self._data + at, FRAME_SIZE)
        c = self.conversation
        return lib.wire_check(self._header, c.guest_pages, c.page_shift, self.accepts, self._why)

    def _rest_of_frame(self) -> int:
        """Bytes still missing from the frame being received, when its header is in; else 0."""
        rx = self.rx
        start = rx.start + (0 if self._got_preamble else PREAMBLE.size)
        if rx.end - start < FRAME_SIZE:
            return 0
        return max(0, start + FRAME_SIZE + max(self._check(start), 0) - rx.end)

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
            if rx.end - rx.start < PREAMBLE.size:
                return self._need_data()
            codec.check_preamble(self._view(rx.start, PREAMBLE.size))
            self._got_preamble = True
            rx.start += PREAMBLE.size
        if rx.end - rx.start < FRAME_SIZE:
            return self._need_data()
        plen = self._check(rx.start)
        if plen < 0:
            why = ffi.string(self._why[0]).decode()
            raise ProtocolViolation(why) if plen == -errno.ENOMSG else RemoteProtocolError(why)
        if rx.end - rx.start < FRAME_SIZE + plen:
            return self._need_data()
        c = self.conversation
        event = codec.decode(self._header, self._view(rx.start + FRAME_SIZE, plen), c.guest_pages, c.page_shift,
                             self._why)
        self.conversation.received(event)
        rx.start += FRAME_SIZE + plen
        return event

    def _need_data(self) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if self.rx.end > self.rx.start:
            raise RemoteProtocolError("the peer closed the connection in the middle of a frame")
        return CLOSED
