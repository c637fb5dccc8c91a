"""Writes the seed inputs of every fuzz target into tests/fuzz/corpus/<target>/seed-*: real frames made by
the codec (migrate/protocol), in each target's input format (see the harness's opening comment).

Deterministic: running it again rewrites the same files.  The corpus also keeps inputs the fuzzers
found (scripts/fuzz --save); this script touches only the seed-* files, of the targets named (default: all).
    python tests/fuzz/seeds.py [wire|frames|link|control ...]
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: helpers

from helpers import conversation  # noqa: E402
from migrate import protocol as p  # noqa: E402
from migrate._native import lib  # noqa: E402
from migrate.protocol import codec  # noqa: E402

PAGES = 100  # the guest the seeds describe
PAGE = p.PAGE_SIZE


def wire(*events: p.Event) -> bytes:
    return b"".join(bytes(c) for e in events for c in codec.encode(e))


def masks() -> dict[str, tuple[int, int]]:
    """The accept masks of the protocol's states, (destination's, source's)."""
    out = {}
    for state in (p.State.STREAMING, p.State.ROUND, p.State.REPLYING, p.State.REQUESTING):
        src, dst = conversation(state, PAGES)
        out[state.name.lower()] = (dst.accepts, src.accepts)
    return out


def wire_seeds(m: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """fuzz_wire.c: a frame header, the guest's pages (8 bytes), the mask (1 byte), runs."""
    guest = struct.pack("<Q", PAGES)
    page = b"\x5a" * PAGE
    seeds = {
        "pages": wire(p.PageRun(3, 1, page))[:p.FRAME_SIZE] + guest + bytes([m["streaming"][0]]),
        "zeros-replace": wire(p.ZeroRun(5, 7, replace=True)) + guest + bytes([m["round"][0]]),
        "discard": wire(p.Discard(40, 60)) + guest + bytes([m["round"][0]]),
        "reply": wire(p.ZeroRun(99, 1, echo=7, held_ns=9)) + guest + bytes([m["replying"][0]]),
        "control": wire(p.SourceDone(100))[:p.FRAME_SIZE] + guest + bytes([m["streaming"][0]]),
    }
    request = wire(p.PageRequest(((0, 1), (50, 50), (99, 1)), stamp=12345))
    seeds["request"] = request[:p.FRAME_SIZE] + guest + bytes([m["requesting"][1]]) + request[p.FRAME_SIZE:]
    seeds.update(huge_wire_seeds(m))
    return seeds


HUGE_BIT = 0x80  # fuzz_wire.c: the mask byte's top bit selects 2 MiB wire pages (a hugetlb guest)
HUGE_PAGES = 16  # a 32 MiB hugetlb guest


def huge_wire_seeds(m: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """fuzz_wire.c at 2 MiB pages: a frame of one huge page (a 2 MiB payload, the largest frame), a
    run of two (refused: one huge page a frame), a reply at the guest's last page, and a request for
    whole huge pages.  A frame's header counts pages; only the page's size differs from 4 KiB."""
    guest = struct.pack("<Q", HUGE_PAGES)
    header = wire(p.PageRun(3, 1, b"\x5a" * PAGE))[:p.FRAME_SIZE]
    two = bytearray(header)
    struct.pack_into("<I", two, 4, 2)  # struct wire_frame's count
    request = wire(p.PageRequest(((0, 1), (7, 1), (HUGE_PAGES - 1, 1)), stamp=54321))
    return {
        "huge-page": header + guest + bytes([m["streaming"][0] | HUGE_BIT]),
        "huge-two-pages": bytes(two) + guest + bytes([m["streaming"][0] | HUGE_BIT]),
        "huge-reply": wire(p.ZeroRun(HUGE_PAGES - 1, 1, echo=3, held_ns=9)) + guest
        + bytes([m["replying"][0] | HUGE_BIT]),
        "huge-request": request[:p.FRAME_SIZE] + guest + bytes([m["requesting"][1] | HUGE_BIT])
        + request[p.FRAME_SIZE:],
    }


def frames_seeds(m: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """fuzz_frames.c: mode, mask, pages - 1, asked, owed, seed (3 bytes); then the peer's bytes."""

    def cfg(mode: int, mask: int, asked: int = 0, owed: int = 0, split: int = 0, seed: int = 1) -> bytes:
        return bytes([mode | split << 2, mask, PAGES - 1, asked, owed]) + seed.to_bytes(3, "big")

    page = bytes(range(256)) * (PAGE // 256)
    stream = wire(p.PageRun(0, 2, page * 2), p.ZeroRun(2, 30), p.PageRun(99, 1, page), p.SourceDone(100))
    rounds = wire(p.PageRun(0, 1, page), p.Discard(10, 20), p.ZeroRun(0, 1, replace=True),
                  p.PageRun(1, 1, page, replace=True), p.RoundEnd(1))
    replies = wire(p.ZeroRun(5, 2, echo=lib.mono_ns(), held_ns=1000), p.PageRun(7, 1, page, echo=1))
    requests = wire(p.PageRequest(((0, 1), (50, 50)), stamp=1), p.PageRequest(((99, 1),), stamp=2), p.DestDone({}))
    return {
        "stream": cfg(0, m["streaming"][0]) + stream,
        "stream-bytewise": cfg(0, m["streaming"][0], split=1) + stream,
        "stream-pieces": cfg(0, m["streaming"][0], split=4, seed=77) + stream,
        "round": cfg(0, m["round"][0], split=3) + rounds,
        "replies": cfg(1, m["replying"][0], asked=10, owed=2) + replies,
        "replies-pieces": cfg(1, m["replying"][0], asked=3, split=2, seed=5) + replies,
        "requests": cfg(2, 0) + requests,
        "requests-pieces": cfg(2, 0, split=3, seed=9) + requests,
    }


def link_seeds() -> dict[str, bytes]:
    """fuzz_link.c: mode, rekey, damage, where; then the payload (a bulk stream's frames)."""
    payload = wire(p.PageRun(0, 1, bytes(range(256)) * (PAGE // 256)), p.ZeroRun(1, 3), p.SourceDone(4))

    def cfg(tls: bool, relay: int, read: int, small_sends: bool = False, rekey: int = 0, damage: int = 0,
            at: int = 0) -> bytes:
        return bytes([tls | relay << 1 | read << 4 | small_sends << 7, rekey, damage, at])

    return {
        "plain": cfg(False, 0, 0) + payload,
        "plain-pieces": cfg(False, 2, 3, damage=130) + payload,
        "plain-cut": cfg(False, 4, 1, damage=200, at=20) + payload,
        "tls": cfg(True, 0, 0) + payload,
        "tls-pieces": cfg(True, 3, 4, small_sends=True, damage=130) + payload,
        "tls-rekey": cfg(True, 5, 6, rekey=24 + 10) + payload,
        "tls-flip": cfg(True, 6, 6, damage=170, at=3) + payload,
        "tls-cut": cfg(True, 2, 5, damage=210, at=40) + payload,
        "tls-garbage": cfg(True, 1, 7, damage=240, at=10) + payload,
    }


def control_seeds() -> dict[str, bytes]:
    """fuzz_control.py: a control frame's msgpack body."""
    events = [
        p.Challenge(b"n" * 32), p.Hello(p.Channel.BULK, b"", b"n" * 32, b"p" * 32),
        p.Welcome(b"s" * 16, b"p" * 32),
        p.GuestInfo(pages=PAGES, vcpus=2, workload=1, seed=2**64 - 1, zero_permille=250, rate=0),
        p.GuestInfo(pages=PAGES, vcpus=2, workload=1, seed=2, zero_permille=250, rate=0, mode=p.Mode.hybrid),
        p.CpuState(((1, 2, 3), (2**64 - 1, 0, 5)), 1_700_000_000_000_000_000),
        p.Round(1, PAGES), p.Round(3, 1234, final=True), p.RoundEnd(2), p.RoundAck(2),
        p.Resume(((0, 100),), more=True), p.Resume(((3, 4),), started=True),
        p.SourceDone(PAGES), p.DestDone({"pages_placed": 100, "ratio": 0.5, "verified": True}), p.Error("gone"),
    ]
    return {f"{i:02}-{type(e).__name__.lower()}": wire(e)[p.FRAME_SIZE:] for i, e in enumerate(events)}


TARGETS = ("wire", "frames", "link", "control")


def main(targets: list[str]) -> None:
    """Rewrites the seeds of ``targets`` (default: every target's)."""
    m = masks()
    makers = {"wire": lambda: wire_seeds(m), "frames": lambda: frames_seeds(m), "link": link_seeds,
              "control": control_seeds}
    for target in targets or TARGETS:
        seeds = makers[target]()
        d = HERE / "corpus" / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for name, data in seeds.items():
            (d / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(seeds)} seeds in {d}")


if __name__ == "__main__":
    main(sys.argv[1:])
