"""The order of messages on each connection: one table, checked for both directions.

Everything that decides whether a message may come now lives here (h11's
rule), for the Python side and the native loops alike: a native loop reads
data frames only while the state it was started in allows them (``accepts``,
the mask it hands ``wire_check``), and stops at the next control frame, whose
turn it is for Python, which brings it here.

Each connection is one conversation.  Its first frames (the handshake) say
which connection of a session it is, and from then on it follows that
channel's rows of ``TABLE``:

- *bulk*: a new session learns the guest (``GuestInfo``); a rejoined one hears
  what the destination's kernel still lacks (``Resume`` frames).  Then, unless
  the switchover is already behind (``Resume(started)``): precopy rounds
  (hybrid and precopy modes), each ``Round`` → page, zero and discard frames →
  ``RoundEnd`` → ``RoundAck``, until a final round whose frames are followed
  by the ``CpuState``; in postcopy the ``CpuState`` at once.  The destination
  says its vCPUs run (``Running``) and the source answers with the downtime it
  measured on its own clock (``Downtime``).  Then the stream (page and zero
  frames, no discard: a vCPU runs there) and ``SourceDone``.
- *requests*: page requests, then ``DestDone`` once every page is placed.
- *replies*: page and zero frames answering the requests.

An ``Error`` may come from either side at any time and ends the conversation.
Anything else out of order is a ``ProtocolViolation`` (from the peer: not a
lost link, so never recovered from) or a ``LocalProtocolError`` (our own bug).
"""

from __future__ import annotations

import enum

from .._native import lib
from ..errors import LocalProtocolError, MigrateError, ProtocolViolation
from .events import (DATA_EVENTS, PAGE_SIZE, CpuState, Discard, Error, Event, GuestInfo, Hello, Mode, PageRequest, PageRun,
                     Resume, Role, Round, RoundAck, RoundEnd, ZeroRun)


class State(enum.Enum):
    """Where a conversation is; each value reads after "a frame arrived ..."."""

    START = "before the Challenge"
    CHALLENGED = "after the Challenge"
    NEW_SESSION = "after a new session's Hello"
    REJOINING = "after a rejoining bulk connection's Hello"
    REQUESTS_HELLO = "after a requests connection's Hello"
    REPLIES_HELLO = "after a replies connection's Hello"
    DESCRIBING = "before the GuestInfo"
    RESUMING = "while the destination says what it lacks"
    AWAITING_CPU = "before the switchover (postcopy)"
    BETWEEN_ROUNDS = "between precopy rounds"
    ROUND = "during a precopy round"
    ROUND_ENDED = "after a round's end, before its acknowledgement"
    FINAL_ROUND = "during the final round"
    STARTING = "after the CpuState, before the destination says its vCPUs run"
    REPORTED = "after the destination said its vCPUs run, before the source's downtime"
    STREAMING = "during the postcopy stream"
    STREAMED = "after SourceDone"
    REQUESTING = "on the requests connection"
    REQUESTS_DONE = "after DestDone"
    REPLYING = "on the replies connection"
    ENDED = "after an Error"


S, D = Role.SOURCE, Role.DESTINATION

_PAGES = 1 << lib.WIRE_PAGES | 1 << lib.WIRE_ZEROS
_DISCARDS = 1 << lib.WIRE_DISCARD  # also allows REPLACE (a discard, then a place): see wire.h
_REQUESTS = 1 << lib.WIRE_REQUEST
_CONTROL = 1 << lib.WIRE_CONTROL
_DATA_KIND = {PageRun: lib.WIRE_PAGES, ZeroRun: lib.WIRE_ZEROS, Discard: lib.WIRE_DISCARD,
              PageRequest: lib.WIRE_REQUEST}
_DATA_SENDER = {PageRun: S, ZeroRun: S, Discard: S, PageRequest: D}

# state: (data frames allowed in it, {(who sends, control message): next state}).
# Data frames never change the state; a control message's label (see label()) names
# the variants that lead to different states.
TABLE: dict[State, tuple[int, dict[tuple[Role, str], State]]] = {
    # The handshake, on every connection: the Hello says which connection it is.
    State.START: (0, {(S, "Challenge"): State.CHALLENGED}),
    State.CHALLENGED: (0, {(D, "Hello(bulk, new)"): State.NEW_SESSION,
                           (D, "Hello(bulk, join)"): State.REJOINING,
                           (D, "Hello(requests, join)"): State.REQUESTS_HELLO,
                           (D, "Hello(replies, join)"): State.REPLIES_HELLO}),
    # bulk
    State.NEW_SESSION: (0, {(S, "Welcome"): State.DESCRIBING}),
    State.DESCRIBING: (0, {(S, "GuestInfo(postcopy)"): State.AWAITING_CPU,
                           (S, "GuestInfo(rounds)"): State.BETWEEN_ROUNDS}),
    State.REJOINING: (0, {(S, "Welcome"): State.RESUMING}),
    State.RESUMING: (0, {(D, "Resume(more)"): State.RESUMING,
                         (D, "Resume(started)"): State.STREAMING,
                         (D, "Resume(waiting, postcopy)"): State.AWAITING_CPU,
                         (D, "Resume(waiting, rounds)"): State.BETWEEN_ROUNDS}),
    State.BETWEEN_ROUNDS: (0, {(S, "Round"): State.ROUND, (S, "Round(final)"): State.FINAL_ROUND}),
    State.ROUND: (_PAGES | _DISCARDS, {(S, "RoundEnd"): State.ROUND_ENDED}),
    State.ROUND_ENDED: (0, {(D, "RoundAck"): State.BETWEEN_ROUNDS}),
    State.FINAL_ROUND: (_PAGES | _DISCARDS, {(S, "CpuState"): State.STARTING}),
    State.AWAITING_CPU: (0, {(S, "CpuState"): State.STARTING}),
    State.STARTING: (0, {(D, "Running"): State.REPORTED}),
    State.REPORTED: (0, {(S, "Downtime"): State.STREAMING}),
    State.STREAMING: (_PAGES, {(S, "SourceDone"): State.STREAMED}),
    State.STREAMED: (0, {}),
    # requests
    State.REQUESTS_HELLO: (0, {(S, "Welcome"): State.REQUESTING}),
    State.REQUESTING: (_REQUESTS, {(D, "DestDone"): State.REQUESTS_DONE}),
    State.REQUESTS_DONE: (0, {}),
    # replies
    State.REPLIES_HELLO: (0, {(S, "Welcome"): State.REPLYING}),
    State.REPLYING: (_PAGES, {}),
    State.ENDED: (0, {}),
}


def label(event: Event, guest: GuestInfo | None) -> str:
    """The name ``TABLE`` knows a control message by: its class, and the variant that decides where it leads."""
    if isinstance(event, Hello):
        return f"Hello({event.channel.value}, {'join' if event.session else 'new'})"
    if isinstance(event, GuestInfo):
        return f"GuestInfo({'postcopy' if event.mode is Mode.postcopy else 'rounds'})"
    if isinstance(event, Resume):
        if event.more:
            return "Resume(more)"
        if event.started:
            return "Resume(started)"
        return f"Resume(waiting, {'postcopy' if guest is None or guest.mode is Mode.postcopy else 'rounds'})"
    if isinstance(event, Round):
        return "Round(final)" if event.final else "Round"
    return type(event).__name__


class Conversation:
    """One connection's place in ``TABLE``, and the few facts its rules compare against.

    Args:
        role: the side this end plays.
        guest: the guest, when known before this connection (a rejoining or
            second connection of a session); otherwise learnt from GuestInfo.
    """

    def __init__(self, role: Role, guest: GuestInfo | None = None) -> None:
        self.role = role
        self.state = State.START
        self.guest = guest
        self._round = 0  # the last Round's number: RoundEnd and RoundAck must match it
        self._resume_pages = 0  # pages named by the Resume frames so far

    @property
    def guest_pages(self) -> int:
        """The bound every page index is checked against (0: no page may come yet)."""
        return self.guest.pages if self.guest is not None else 0

    @property
    def page_size(self) -> int:
        """The wire page: the guest memory's page (before GuestInfo, the base page)."""
        return self.guest.page_size if self.guest is not None else PAGE_SIZE

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @property
    def accepts(self) -> int:
        """The frame kinds the peer may send now, as the mask ``wire_check`` takes."""
        return self.mask(D if self.role is S else S)

    def mask(self, sender: Role) -> int:
        """The frame kinds ``sender`` may send now (control frames always: which ones is the table's)."""
        data, _ = TABLE[self.state]
        return _CONTROL | sum(1 << kind for cls, kind in _DATA_KIND.items()
                              if data >> kind & 1 and _DATA_SENDER[cls] is sender)

    def received(self, event: Event) -> None:
        """Moves on past a message from the peer; RemoteProtocolError if it may not come now."""
        self._advance(D if self.role is S else S, event, ProtocolViolation)

    def sent(self, event: Event) -> None:
        """Moves on past a message of ours; LocalProtocolError if it may not go now."""
        self._advance(self.role, event, LocalProtocolError)

    def _advance(self, sender: Role, event: Event, error: type[MigrateError]) -> None:
        if isinstance(event, Error):
            self.state = State.ENDED
            return
        if isinstance(event, DATA_EVENTS):
            return  # never a move: whether it may come is wire_check's, against mask()
        _, moves = TABLE[self.state]
        name = label(event, self.guest)
        after = moves.get((sender, name))
        if after is None:
            expected = ", ".join(f"{n} from the {who.value}" for who, n in moves) or "nothing"
            raise error(f"{name} from the {sender.value} {self.state.value} (expected: {expected})")
        self._check(event, error)
        self.state = after

    def _check(self, event: Event, error: type[MigrateError]) -> None:
        """The rules that compare a message with earlier ones (the table has decided that it may come)."""
        if isinstance(event, GuestInfo):
            if self.guest is not None and event != self.guest:
                raise error("GuestInfo describes another guest than this connection's session")
            self.guest = event
        elif isinstance(event, Round):
            if event.number <= self._round:
                raise error(f"round {event.number} after round {self._round}")
            self._round = event.number
        elif isinstance(event, (RoundEnd, RoundAck)):
            if event.number != self._round:
                raise error(f"{type(event).__name__}({event.number}) during round {self._round}")
        elif isinstance(event, CpuState):
            if self.guest is None:
                raise error("CpuState before the guest was described")
            if len(event.vcpus) != self.guest.vcpus:
                raise error(f"the state of {len(event.vcpus)} vCPUs for a guest of {self.guest.vcpus}")
        elif isinstance(event, Resume):
            pages = self.guest_pages
            for start, count in event.runs:
                if count < 1 or start + count > pages:
                    raise error(f"pages {start}+{count} are outside the guest of {pages} pages")
            # More than the whole guest would be a peer making us send without end.
            self._resume_pages += sum(count for _, count in event.runs)
            if self._resume_pages > pages:
                raise error(f"Resume names {self._resume_pages} pages, more than the guest's {pages}")
            if not event.more:
                self._resume_pages = 0
