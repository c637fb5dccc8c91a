"""The statistics a migration reports: their types, and the metrics JSON they make.

Each side returns one frozen dataclass when it is done (trio's
``statistics()`` model); ``--metrics`` writes its ``to_json()``.  Field names
are the JSON keys, units in the names, so the scripts that read metrics files
need nothing from here; tests and tools that do get the typed object back with
``from_json``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Self


class Stats:
    """One way to JSON and back, for every statistics class below."""

    def to_json(self) -> dict[str, Any]:
        """The fields by name, nested statistics as dicts, tuples as lists: what ``json.dumps`` writes.

        A field made with ``_optional`` is left out at its default: its key
        appears only when it says something.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not (f.metadata.get("optional") and value == f.default):
                out[f.name] = _to_json(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        """The typed object that ``to_json`` made ``data`` from, nested statistics included.

        Raises:
            KeyError: ``data`` lacks a field that has no default.
        """
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _from_json(hints[f.name], data[f.name])
                      for f in fields(cls) if f.name in data or not f.metadata.get("optional")})


def _optional(default: object) -> Any:
    """A field whose key the JSON has only when it differs from ``default`` (as before the types)."""
    return field(default=default, metadata={"optional": True})


def _to_json(value: object) -> object:
    if isinstance(value, Stats):
        return value.to_json()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` names: statistics and tuples rebuilt, scalars and dicts as they are."""
    if value is None:
        return None
    args = typing.get_args(hint)
    if typing.get_origin(hint) is types.UnionType:  # X | None, and the value is not None
        return _from_json(next(a for a in args if a is not type(None)), value)
    if typing.get_origin(hint) is tuple:
        each = args[:1] * len(value) if args[-1] is Ellipsis else args
        return tuple(_from_json(a, v) for a, v in zip(each, value, strict=True))
    if isinstance(hint, type) and issubclass(hint, Stats):
        return hint.from_json(value)
    return value


@dataclass(frozen=True)
class LatencySummary(Stats):
    """Latencies of one kind: how many, p50/p99/max in µs (bucket edges, ~12%), and their sum in ms."""

    count: int
    p50: float
    p99: float
    max: float
    total_ms: float


@dataclass(frozen=True)
class StallSummary(LatencySummary):
    """The vCPUs' stalls, also in QEMU's postcopy-latency-dist layout, and the slow accesses that never slept.

    ``hist`` lists the non-empty buckets as (upper edge µs, count): enough
    to draw the stall CDF without keeping every sample.
    """

    qemu_dist: tuple[int, ...]
    slow_other: int
    slow_other_ms: float
    hist: tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class Hops(Stats):
    """Where a served fault's time went, hop by hop, in µs: which one to shorten."""

    fault_to_request: LatencySummary
    network: LatencySummary
    source_held: LatencySummary
    reply_to_placed: LatencySummary


@dataclass(frozen=True)
class Recovery(Stats):
    """One lost link at the destination: seconds to reconnect, and pages its kernel still lacked then."""

    reconnect_s: float
    pages_missing: int


@dataclass(frozen=True)
class Round(Stats):
    """One precopy round at the source: pages and bytes sent, seconds, and pages the guest wrote meanwhile."""

    round: int
    pages: int
    bytes: int
    seconds: float
    dirty_pages_found: int | None  # None: not scanned (the vCPUs stopped before a scan)
    discarded: int | None = _optional(None)  # a hybrid round that drops, instead of sending, what did not converge
    resent_after_recovery: bool = _optional(False)


@dataclass(frozen=True)
class GuestPace(Stats):
    """The source guest's steps per second before the migration and during the rounds: what precopy costs it."""

    before: int
    during_precopy: int | None  # None in postcopy: no rounds
    ratio: float | None  # None when too few steps ran before to tell


@dataclass(frozen=True)
class Switchover(Stats):
    """The source's switchover: pages dirty at the stop, discarded there or copied in the downtime, and its ms."""

    dirty_pages: int
    pages_discarded: int
    stop_and_copy_pages: int
    stopped_to_cpu_state_ms: float
    working_set_pages: int | None  # None unless the stream goes in working-set order


@dataclass(frozen=True)
class FirstWindow(Stats):
    """The first window the postcopy stream sent: pages, runs and the span [start, end) of page numbers."""

    pages: int
    runs: int
    start: int
    end: int


@dataclass(frozen=True)
class MemoryHeld(Stats):
    """What the process holds in memory, MiB, from /proc/self/status and the guest's line of /proc/self/smaps.

    ``rss_mib`` (``VmHWM``) alone misjudges it both ways: the guest's zero pages that no one wrote are
    never resident (anonymous memory maps the shared zero page), so "RSS - guest" went negative for a
    zero-heavy guest, and huge pages are not in RSS at all (``HugetlbPages``), while shared memory is
    (``RssShmem``).  ``beyond_guest`` is the peak RSS plus the huge pages mapped, less the guest's pages
    present when measured: at least what the process holds beside its guest then, at most its peak of it
    (the guest's present pages only grow before the measurement).
    """

    peak_rss: float  # VmHWM: the peak of RssAnon + RssFile + RssShmem
    rss_anon: float
    rss_file: float
    rss_shmem: float
    hugetlb: float  # HugetlbPages: huge pages mapped, outside RSS
    guest_present: float  # the guest mapping's Rss (not the shared zero page) plus its huge pages
    beyond_guest: float  # peak_rss + hugetlb - guest_present


@dataclass(frozen=True)
class SideStats(Stats):
    """What both sides report alike: the guest, the bytes of each channel, TLS, and the process's peak RSS."""

    mode: str
    pages_total: int  # pages of page_size bytes, the memory's own (as every page count here)
    guest_mib: float
    memory: str  # anon, memfd or hugetlb
    page_size: int  # 4096, or 2097152 on hugetlb
    vcpu_steps: tuple[int, ...]  # each vCPU's steps when it stopped here
    bytes_bulk: int
    bytes_urgent: int
    tls: str  # the negotiated protocol and cipher, or "plaintext"
    tls_rekeys: int
    rss_mib: float
    # What the process holds beyond its guest, kind by kind (MemoryHeld); keyword-only, so it may
    # come last and stay out of the JSON where a side did not measure it.
    memory_mib: MemoryHeld | None = field(default=None, kw_only=True, metadata={"optional": True})


@dataclass(frozen=True)
class DestinationStats(SideStats):
    """What migrate-dst reports: pages, bytes, faults, latencies and the proof of one migration.

    Pages are the memory's pages (``page_size``); placements count every page the loops placed
    (a replaced page each time); ``eexist`` counts races the kernel absorbed.
    """

    precopy_rounds: int
    pages_missing_at_switchover: int
    pages_replaced: int
    pages_discarded: int
    pages_discarded_at_switchover: int
    placements: int
    bytes_total: int
    pages_placed: int
    verified: bool | None  # None: not checked (no --verify)
    downtime_ms: float | None  # as the source measured it (None: a lost link took its answer)
    total_s: float
    connect_to_done_s: float
    bytes_requests: int
    stream_gbps: float
    faults: int
    requests: int
    pages_requested: int
    eexist: int
    eexist_bulk: int
    eexist_urgent: int
    pages_placed_bulk: int
    pages_placed_urgent: int
    zero_pages: int
    vcpu_stall_us: StallSummary
    fault_service_us: LatencySummary
    hops_us: Hops
    vcpu_steps_at_placed: tuple[int, ...]  # where the vCPUs were as the last page arrived
    workload: str
    vcpus: int
    recoveries: tuple[Recovery, ...]
    connect_attempts: int
    placed_timeline: tuple[tuple[float, int, int], ...]  # (seconds since switchover, bulk pages, urgent pages)
    vmm_pid: int | None = _optional(None)  # --handoff: the VMM whose memory was filled (it runs the vCPUs)
    vmm_removes: int = _optional(0)  # UFFD_EVENT_REMOVE the VMM sent (a balloon, MADV_DONTNEED)
    vmm_removed_pages: int = _optional(0)  # pages they named
    vmm_holes_zeroed: int = _optional(0)  # pages of removed ranges still absent at the end, placed as zero pages


@dataclass(frozen=True)
class SourceStats(SideStats):
    """What migrate-src reports: pages and bytes sent, rounds, switchover, pacing and pre-paging."""

    stream_order: str
    pages_streamed: int
    pages_requested: int
    requests: int
    rejected_peers: int
    dropped_peers: int
    total_s: float
    migration_s: float
    precopy_s: float
    bytes_sent_total: int
    recoveries: int
    request_held_us: LatencySummary
    notes_dropped: int
    max_bandwidth_bytes_per_s: int
    prepage: str
    prepage_stats: dict[str, int]  # the policy's own counters, by name
    window_pages: int
    pacer_waits: int
    pacer_waited_ms: float
    stream_timeline: tuple[tuple[float, int], ...]  # (seconds since the stop, bytes streamed)
    rounds: tuple[Round, ...]
    guest_steps_per_s: GuestPace
    switchover: Switchover
    first_window: FirstWindow | None  # None: the stream sent nothing after the switchover


@dataclass(frozen=True)
class RestoreStats(Stats):
    """What migrate-vmm reports: a snapshot restored through a page-fault handler, and its proof.

    ``first_step_ms`` runs from the handoff message sent to the first vCPU's first access done (its
    page placed by the handler if it was missing): Firecracker's time to resume, from the guest's
    side.  ``pages_present_after_run`` are the pages the handler had placed when the vCPUs stopped;
    the digest then faults in the rest.
    """

    firecracker: str  # the version whose handoff message was sent
    regions: int
    memory: str
    page_size: int
    pages_total: int
    guest_mib: float
    vcpus: int
    workload: str
    first_step_ms: float | None  # None: no vCPU took a step
    run_s: float
    vcpu_steps: tuple[int, ...]  # each vCPU's steps when it stopped (the snapshot's included)
    steps_run: int  # steps run here, all vCPUs
    pages_present_after_run: int
    vcpu_stall_us: StallSummary
    verified: bool
    rss_mib: float


@dataclass(frozen=True)
class SourceCounters:
    """A running source's counters at one instant, as ``statistics()`` reads them from the native loops.

    Not part of the metrics JSON: the progress line, the stream's timeline
    and the final ``SourceStats`` are all made from these snapshots, so the
    live figures and the final ones cannot disagree.
    """

    pages_streamed: int  # by the rounds, the stop-and-copy and the stream
    bytes_streamed: int
    pages_discarded: int  # DISCARD frames' pages
    pages_requested: int  # sent by the request server
    bytes_urgent: int
    requests: int
    notes_dropped: int  # served runs the streamer never heard of (a full ring): duplicates at worst
    pacer_waits: int
    pacer_waited_ns: int


@dataclass(frozen=True)
class DestinationCounters:
    """A running destination's counters at one instant, as ``statistics()`` reads them from the native loops.

    Not part of the metrics JSON: the progress line, the placed-pages
    timeline and the final ``DestinationStats`` are all made from these
    snapshots.  ``pages_placed`` is what is present, by the counters (see
    ``Destination.statistics``).
    """

    pages_total: int
    pages_placed: int
    pages_placed_bulk: int
    pages_placed_urgent: int
    bytes_bulk: int
    bytes_urgent: int
    bytes_requests: int
    eexist_bulk: int
    eexist_urgent: int
    zero_pages: int
    pages_replaced: int
    pages_discarded: int
    faults: int
    requests: int
    pages_requested: int

    @property
    def eexist(self) -> int:
        """Pages the kernel already had when asked to place them: races it absorbed."""
        return self.eexist_bulk + self.eexist_urgent
