"""The native sender on the bulk connection, and its pacer, as the rounds, the switchover and the stream use them.

One place for the calls into ``src_stream_runs`` and ``src_stream_discards``:
pages go straight from guest memory to the link, zero runs as zero frames,
in a worker thread; the counters (``send_stats_t``) are written by the sender
alone and read by anyone for progress and statistics.  The pacer is a token
bucket (``--max-bandwidth``) shared by the rounds and the postcopy stream,
kept across windows and sessions, so the cap holds over the whole background
stream; the stop-and-copy inside the downtime is never paced.
"""

from __future__ import annotations

from typing import Any

from .._native import ffi, lib
from ..loops import run_native
from ..wire import FrameSocket

# The cap's bucket holds this much time at the cap (and at least
# MIN_BURST_BYTES): enough to make up for the pause between two windows while
# the streamer picks the next (measured: with 1 ms the stream lost 3-6% of a
# 50 MB/s cap on a busy machine).  One send takes at most QUANTUM_S at the
# cap (and at least MIN_QUANTUM_BYTES): in a steady stream no burst at a
# bottleneck is longer.  Over any second the stream sends at most the cap
# plus the bucket plus one send (pacer_t), 0.55% of the cap, so it holds the
# cap to 1% in every second; the floors keep that true down to a cap of
# 1 MB/s (0.91% there; with floors of 128 and 16 KiB a 2 MB/s stream's first
# second was 7% over: tests/test_bandwidth.py).
BURST_S = 0.005
MIN_BURST_BYTES = 4096
QUANTUM_S = 0.0005
MIN_QUANTUM_BYTES = 4096


def run_array(runs: list[tuple[int, int]]) -> Any:
    """``runs`` as the C array (``struct wire_run[]``) the native sender reads."""
    return ffi.new("struct wire_run[]", [{"start": start, "count": count} for start, count in runs])


class Sender:
    """Sends pages of the guest at ``base`` (``pages`` pages) and discards on a bulk connection.

    Args:
        base: the guest's address.
        pages: the guest's size in wire pages, which every run must fit in.
        page_shift: the wire page's (the memory's page): 12, or 21 on hugetlb.
        idle_ms: how long a send may wait for the peer before the link counts as lost.
        max_bandwidth: the cap of paced sends in bytes per second; 0: none.
    """

    def __init__(self, base: int, pages: int, page_shift: int, idle_ms: int, max_bandwidth: int) -> None:
        self.base = base
        self.pages = pages
        self.page_shift = page_shift
        self.page_size = 1 << page_shift
        self.idle_ms = idle_ms
        self.stats = ffi.new("send_stats_t *")  # written by the native sender alone
        self.pacer = ffi.new("pacer_t *")  # used by the sender alone, one send at a time
        self.pacer.rate = max_bandwidth
        self.pacer.burst = max(MIN_BURST_BYTES, round(max_bandwidth * BURST_S))
        self.pacer.quantum = max(MIN_QUANTUM_BYTES, round(max_bandwidth * QUANTUM_S))

    async def send_runs(self, bulk: FrameSocket, array: Any, count: int, *, replace: bool = False,
                        paced: bool = True) -> None:
        """Sends the ``count`` runs of ``array``; ``replace`` flags them so that each replaces its older copy
        there; ``paced``: under the cap (not inside the downtime).

        **Cancellation**: stops the sender through its eventfd and waits for it;
        a frame cut part-way marks the link cut.
        """
        ctx = self.context(bulk, self.pacer if paced else ffi.NULL)
        await run_native(lib.src_stream_runs, ctx, array, count, lib.WIRE_REPLACE if replace else 0, peer=bulk.peer)

    async def send_discards(self, bulk: FrameSocket, array: Any, count: int) -> None:
        """Tells the destination to drop the ``count`` runs of ``array`` (DISCARD frames, no payload).

        **Cancellation**: as ``send_runs``.
        """
        await run_native(lib.src_stream_discards, self.context(bulk), array, count, peer=bulk.peer)

    def context(self, fs: FrameSocket, pace: Any = ffi.NULL, stats: Any = None) -> Any:
        """The native sender's context (``src_sender_t``) for frames leaving on ``fs``, counted in ``stats``
        (default: the stream's).  It points into ``fs``, the pacer and the counters, which outlive the send."""
        return ffi.new("src_sender_t *", {"base": self.base, "pages": self.pages, "page_shift": self.page_shift,
                                          "link": fs.link,
                                          "idle_ms": self.idle_ms, "pace": pace,
                                          "st": self.stats if stats is None else stats})
