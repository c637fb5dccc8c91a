"""What the two sides say to each other: one frozen dataclass per message, and the bounds of each.

Events carry no wire format (``codec.py``) and no order (``state.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

from .._native import lib


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
    """The three connections of a session: see ``state.py`` for what each carries."""

    BULK = "bulk"
    REQUESTS = "requests"
    REPLIES = "replies"


# The base page: the wire page of anonymous and memfd guests (a hugetlb guest's is 2 MiB: GuestInfo.page_size).
PAGE_SIZE: int = lib.WIRE_PAGE_SIZE
# A page run of 4 KiB pages carries at most this many: one UFFDIO_COPY places it whole (lib.wire_max_run
# gives the bound for any page size: one page of 2 MiB).
MAX_RUN_PAGES: int = lib.WIRE_MAX_RUN_PAGES
# The largest payload of a frame: a run of 1 MiB, or one 2 MiB page.
MAX_PAYLOAD: int = lib.WIRE_MAX_PAYLOAD
# A page request names at most this many runs: one batch of faults read from the uffd.
MAX_REQUEST_RUNS: int = lib.WIRE_MAX_REQUEST_RUNS
# A Resume lists what the destination's kernel still lacks, possibly scattered:
# split into frames of this many runs, which fit a control frame's body.
MAX_RESUME_RUNS = 1024
NONCE_LEN = 32


@dataclass(frozen=True)
class Challenge:
    """Source → destination, first frame of every connection: a fresh nonce to prove the key against."""

    nonce: bytes


@dataclass(frozen=True)
class Hello:
    """Destination → source: which connection this is, the session it joins (``b""``: a new one), its proof."""

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
    """Source → destination on a new session's bulk connection: what guest is coming, and how.

    ``pages`` counts pages of ``page_size`` bytes, the memory's own (2 MiB for hugetlb): the wire page.
    ``memory`` is the kind (``migrate.memory.Memory``: 0 anon, 1 memfd, 2 hugetlb).
    """

    pages: int
    vcpus: int
    workload: int
    seed: int
    zero_permille: int
    rate: int
    mode: Mode = Mode.postcopy
    page_size: int = PAGE_SIZE
    memory: int = 0

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1


@dataclass(frozen=True)
class CpuState:
    """Source → destination at switchover: every vCPU's (prng, steps, acc)."""

    vcpus: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Running:
    """Destination → source, on bulk, as soon as the vCPUs run from the CPU state: the source reads the
    downtime on its own clock, from its vCPUs' stop to this report (QEMU's return path)."""


@dataclass(frozen=True)
class Downtime:
    """Source → destination, on bulk, the answer to ``Running``: the downtime the source measured (its
    vCPUs' stop to the report, less half the connection's round trip), before the stream."""

    ns: int


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
    """``count`` all-zero pages from page ``start``: nothing sent; placed with UFFDIO_ZEROPAGE, or on
    hugetlb (which refuses it) with UFFDIO_COPY from a zero page."""

    start: int
    count: int
    echo: int = 0
    held_ns: int = 0
    replace: bool = False


@dataclass(frozen=True)
class Discard:
    """Source → destination before switchover: make these pages absent again (they were written since sent)."""

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
    """Either way, at any time: the sender gives up, and says why."""

    message: str


Event = Union[Challenge, Hello, Welcome, GuestInfo, CpuState, Running, Downtime, PageRun, ZeroRun, Discard, PageRequest, Round,
              RoundEnd, RoundAck, Resume, SourceDone, DestDone, Error]
DATA_EVENTS = (PageRun, ZeroRun, Discard, PageRequest)  # the hot path's frames, spoken by the native loops too
