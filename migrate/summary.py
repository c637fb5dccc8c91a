"""The human summary migrate-dst prints at the end."""

from __future__ import annotations

from typing import IO

from .stats import DestinationStats


def stalls_vs_faults(stalls: int, faults: int) -> str:
    """Why the vCPUs' stall count and the fault reader's fault count differ, if they do.

    They count different things: a stall is an access during which a vCPU
    slept; a fault is a message the fault reader read.  A fault whose page
    was placed before its vCPU went to sleep (the kernel re-checks after
    queuing the message) is no stall; a vCPU that the bulk stream woke
    before its fault was read stalled with no fault read (a wake-up takes
    the waiter's unread message away).  Both happen; the gap is the net.
    """
    if stalls == faults:
        return "one per fault"
    if stalls < faults:
        return f"faults {faults}: for the other {faults - stalls} the page arrived before the vCPU went to sleep"
    return f"faults {faults}: the bulk stream woke {stalls - faults} vCPU waits before their fault was read"


def print_summary(m: DestinationStats, out: IO[str]) -> None:
    """A short table of what happened; the last line says whether the guest was proven identical."""
    stall, service = m.vcpu_stall_us, m.fault_service_us
    mib = m.bytes_bulk / 2**20
    lines = [
        "── migration summary ─────────────────────────────",
        f"guest            {m.guest_mib:.0f} MiB, {m.vcpus} vCPUs, {m.workload}, {m.mode}, {m.memory}",
        *([f"precopy          {m.precopy_rounds} rounds, {m.pages_replaced} pages replaced, "
           f"{m.pages_discarded_at_switchover} discarded at switchover"] if m.mode != "postcopy" else []),
        f"pages placed     {m.pages_placed}/{m.pages_total}{f' of {m.page_size >> 20} MiB' if m.page_size >= 2**20 else ''}"
        f" ({m.zero_pages} as zero pages)",
        f"downtime         {m.downtime_ms:.2f} ms (source vCPUs stopped → running here, on the source's clock)"
        if m.downtime_ms is not None else "downtime         unknown (a lost link took the source's figure)",
        f"memory arrived   in {m.total_s:.2f} s, {mib:.0f} MiB on the bulk channel ({m.stream_gbps:.2f} GB/s)",
        f"faults           {m.faults} in {m.requests} requests, {m.bytes_urgent / 2**20:.1f} MiB urgent",
        *([f"vCPU stalls      {stall.count} accesses waited for a page, p50 {stall.p50:.0f} µs, "
           f"p99 {stall.p99:.0f} µs, max {stall.max:.0f} µs, {stall.total_ms:.1f} ms in all",
           f"                 ({stalls_vs_faults(stall.count, m.faults)})"] if m.vmm_pid is None else
          [f"vCPU stalls      in the VMM (pid {m.vmm_pid}), which runs the vCPUs: see its own report"]),
        *([f"not stalls       {stall.slow_other} slow accesses ({stall.slow_other_ms:.1f} ms) that never slept "
           "for a page (copy-on-write, preemption)"] if stall.slow_other else []),
        f"fault service    p50 {service.p50:.0f} µs, p99 {service.p99:.0f} µs, max {service.max:.0f} µs",
        f"races absorbed   {m.eexist} pages already present when placed (no userland page state)",
        *([f"encryption       {m.tls}"] if m.tls != "plaintext" else []),
        *(f"recovery         link lost and back in {r.reconnect_s * 1000:.0f} ms, "
          f"{r.pages_missing} pages still absent were streamed again" for r in m.recoveries),
        f"verified: {'yes' if m.verified else 'NO' if m.verified is False else 'not checked (use --verify)'}"
        if m.vmm_pid is None else f"verified: by the VMM (pid {m.vmm_pid}), which runs the guest",
    ]
    print("\n".join(lines), file=out, flush=True)
