"""The wire protocol, sans-io: bytes in, events out; no sockets, no trio.

Read in this order:

- ``events.py``: what the two sides say, one frozen dataclass per message;
- ``state.py``: in what order, per connection, as one table (and the ERROR rule);
- ``codec.py``: how each message becomes bytes (``native/wire.h``'s frame header,
  shared with the native loops; msgpack bodies for control messages);
- ``auth.py``: the key proofs of the handshake;
- ``connection.py``: one side of one connection, tying the three together.

Connections: the *bulk* connection carries the handshake, the guest's
description, the precopy rounds, the CPU state and the background stream;
page requests go on a *requests* connection and their replies come back on a
*replies* connection, so that a fault never waits behind megabytes of stream
and every direction of every connection has one owner thread (OpenSSL
forbids reading and writing one connection from two threads at once).
"""

from .auth import check_hello, check_welcome, hello, new_nonce, proof_ok, prove, welcome
from .codec import FRAME_SIZE, MAGIC, VERSION
from .connection import CLOSED, NEED_DATA, Connection
from .events import (MAX_PAYLOAD, MAX_REQUEST_RUNS, MAX_RESUME_RUNS, MAX_RUN_PAGES, PAGE_SIZE, Challenge, Channel, CpuState,
                     DestDone, Discard, Downtime, Error, Event, GuestInfo, Hello, Mode, PageRequest, PageRun, Resume, Role,
                     Round, RoundAck, RoundEnd, Running, SourceDone, Welcome, ZeroRun)
from .state import TABLE, Conversation, State

__all__ = [
    "CLOSED", "FRAME_SIZE", "MAGIC", "MAX_PAYLOAD", "MAX_REQUEST_RUNS", "MAX_RESUME_RUNS", "MAX_RUN_PAGES", "NEED_DATA", "PAGE_SIZE",
    "TABLE", "VERSION", "Challenge", "Channel", "Connection", "Conversation", "CpuState", "DestDone", "Discard",
    "Error", "Event", "GuestInfo", "Hello", "Mode", "PageRequest", "PageRun", "Resume", "Role", "Round", "RoundAck",
    "RoundEnd", "SourceDone", "State", "Welcome", "ZeroRun", "check_hello", "check_welcome", "hello", "new_nonce",
    "proof_ok", "prove", "welcome",
]
