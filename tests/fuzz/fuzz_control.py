"""Coverage-guided fuzzing (atheris, libFuzzer for Python) of the control-frame decoder.

The input is a control frame's msgpack body, as a hostile peer would send it.
It goes through ``codec._decode_control`` alone, and then, framed, through a
``Connection`` of both roles in one of the conversation states where control
frames come (picked by the input's length).  Checked:

- the decoder raises ``RemoteProtocolError`` or returns an event, nothing else;
- an event it returns encodes again (no field passes the decoder that the
  encoder refuses) into a body that decodes to the same event;
- a Connection accepts only an ``Error`` or a move of ``TABLE`` from its state,
  and raises ``RemoteProtocolError`` for anything else.

Any other exception or a broken assertion is a crash, which atheris reports
with the input (saved as crash-*).  Run by scripts/fuzz:
    python tests/fuzz/fuzz_control.py -max_total_time=60 tests/fuzz/corpus/control
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

with atheris.instrument_imports(include=["migrate"]):
    from migrate import protocol as p
    from migrate.errors import RemoteProtocolError
    from migrate.protocol import codec

from helpers import conversation  # noqa: E402

# The states a control frame can meet, on every channel (the handshake's own are reached through these).
STATES = [p.State.DESCRIBING, p.State.AWAITING_CPU, p.State.BETWEEN_ROUNDS, p.State.ROUND, p.State.FINAL_ROUND,
          p.State.STREAMING, p.State.RESUMING, p.State.REQUESTING, p.State.REPLYING]
HEADER = struct.Struct("<IIQQII")  # struct wire_frame (native/wire.h)


def _body(event: p.Event) -> bytes:
    return b"".join(bytes(c) for c in codec.encode(event))[p.FRAME_SIZE:]


def test_one_input(data: bytes) -> None:
    try:
        event = codec._decode_control(data)
    except RemoteProtocolError:
        event = None
    if event is not None:
        assert codec._decode_control(_body(event)) == event, event
    if not 0 < len(data) <= codec.MAX_CONTROL:
        return
    to = STATES[len(data) % len(STATES)]
    frame = HEADER.pack(4, len(data), 0, 0, 0, 0) + data
    for conn in conversation(to):
        before = conn.state
        conn.receive_data(frame)
        try:
            got = conn.next_event()
        except RemoteProtocolError:
            continue
        assert got is not p.NEED_DATA
        peer = p.Role.DESTINATION if conn.role is p.Role.SOURCE else p.Role.SOURCE
        assert isinstance(got, p.Error) or (peer, p.state.label(got, conn.conversation.guest)) in p.TABLE[before][1]


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
