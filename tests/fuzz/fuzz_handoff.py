"""Coverage-guided fuzzing (atheris) of Firecracker's handoff message as ``migrate-dst --handoff`` parses it.

The input is the message's bytes, as a VMM (or whoever reaches the socket) sends them.  Checked:

- ``handoff.parse`` raises ``RemoteProtocolError`` or returns regions, nothing else;
- the regions it returns are what it promises: 1 to 64, each page 4 KiB or 2 MiB, base, size and
  offset aligned to it, size > 0, none overlapping another in the address space or in the file;
- they encode again (as Firecracker 1.12 sends them) into a message that parses to the same regions.

Run by scripts/fuzz:
    python tests/fuzz/fuzz_handoff.py -max_total_time=60 tests/fuzz/corpus/handoff
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["migrate"]):
    from migrate import handoff
    from migrate.errors import RemoteProtocolError


def _disjoint(spans: list[tuple[int, int]]) -> bool:
    spans = sorted(spans)
    return all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:]))


def test_one_input(data: bytes) -> None:
    try:
        regions = handoff.parse(data)
    except RemoteProtocolError:
        return
    assert 1 <= len(regions) <= handoff.MAX_REGIONS, regions
    for r in regions:
        assert r.page_size in handoff.PAGE_SIZES and r.size > 0, r
        assert not (r.base | r.size | r.offset) % r.page_size, r
    assert _disjoint([(r.base, r.base + r.size) for r in regions]), regions
    assert _disjoint([(r.offset, r.offset + r.size) for r in regions]), regions
    assert handoff.parse(handoff.encode(regions, "1.12")) == regions, regions


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
