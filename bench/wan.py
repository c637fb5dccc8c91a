"""An emulated WAN link on this machine, for the bench and the tests: ``with emulated_link(spec) as link:``.

This kernel has no netem, so the link is built from what it has::

    namespace S (source side)      namespace W (the wire)                    namespace D (destination side)
    s0 10.199.0.1 ──veth── ws ─┐  wanfwd: holds each frame RTT/2,    ┌─ wd ──veth── d0 10.199.0.2
                               └─ both ways, then sends it on ───────┘
                                  egress of ws and of wd: htb at the link's rate, a bottleneck
                                  queue of --queue-ms, and a band for DSCP EF (priority=True)

- Bandwidth and the bottleneck queue: the kernel's ``htb`` on the egress of
  both of W's interfaces (the link is symmetric).  Two leaf classes share the
  rate: 1:20 (everything, by default) and 1:10 (the urgent band, served
  first); each holds a byte FIFO of the queue's size.  With ``priority`` a
  ``u32`` filter sends frames marked DSCP EF (TOS 0xb8, what uffd-migrate
  puts on its requests and replies connections) to the urgent band, as a
  router honouring DiffServ would; without it the bottleneck is one FIFO.
- Delay: ``bench/wanfwd.c``, a transparent bridge between ws and wd (neither
  has an address) that holds every frame for half the round trip before it
  sends it on, so the frame then meets the shaper.  It keeps TSO/GSO frames
  whole (PACKET_VNET_HDR), so it moves 64 KiB at a time, not 1.5.

Every address is inside the namespaces this module made (10.199.0.1 and .2
exist only there); nothing outside them is touched, and leaving the ``with``
block stops the forwarder and deletes the namespaces, veths and qdiscs with
them.  Needs root (``LinkUnavailable`` otherwise).  Processes a caller starts
in a namespace (``link.exec_in``) are the caller's to stop.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
SRC_ADDR, DST_ADDR = "10.199.0.1", "10.199.0.2"
URGENT_TOS = 0xB8  # DSCP EF, as migrate.wire marks the urgent connections
# The urgent band's guaranteed share of the link: requests and replies need
# little, and whatever it does not use the bulk class borrows.
URGENT_SHARE = 0.05
# The bottleneck queue holds at least this much, whatever the rate: four
# 64 KiB GSO frames (fewer would drop a burst of one TSO send).
MIN_QUEUE_BYTES = 256 * 1024
_names = itertools.count()


class LinkUnavailable(Exception):
    """The link cannot be made here (not root, no ip/tc, no veth...): the message says why."""


@dataclass(frozen=True)
class LinkSpec:
    """What the link emulates.

    Args:
        rate_bps: bits per second, both ways.
        rtt_ms: round-trip delay added, half each way.
        queue_ms: the bottleneck queue's size, as time at the link's rate.
        priority: whether the bottleneck serves DSCP EF frames first.
    """

    rate_bps: float
    rtt_ms: float
    queue_ms: float = 5.0
    priority: bool = True

    @classmethod
    def parse(cls, text: str, **kw: object) -> "LinkSpec":
        """``RATE,RTT`` such as ``1Gbit,1ms``, ``10G,0.1ms`` or ``100Mbit,10`` (RATE in bits/s; RTT in ms)."""
        m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)(?:bit|bps|b)?(?:/s)?\s*,\s*([\d.]+)\s*(ms|us)?\s*", text)
        if not m:
            raise ValueError(f"{text!r} is not RATE,RTT (e.g. 1Gbit,1ms)")
        rate = float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2].lower()]
        rtt = float(m[3]) / (1000 if m[4] == "us" else 1)
        if rate <= 0 or rtt < 0:
            raise ValueError(f"{text!r}: the rate must be positive and the RTT not negative")
        return cls(rate, rtt, **kw)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        rate = f"{self.rate_bps / 1e9:g}Gbit" if self.rate_bps >= 1e9 else f"{self.rate_bps / 1e6:g}Mbit"
        return f"{rate},{self.rtt_ms:g}ms"

    @property
    def bytes_per_s(self) -> float:
        return self.rate_bps / 8

    @property
    def queue_bytes(self) -> int:
        return max(MIN_QUEUE_BYTES, round(self.bytes_per_s * self.queue_ms / 1000))


@dataclass
class Link:
    """A link that exists: its namespaces, addresses, and what its forwarder counted (after the ``with``)."""

    spec: LinkSpec
    src_ns: str
    dst_ns: str
    wire_ns: str
    src_addr: str = SRC_ADDR
    dst_addr: str = DST_ADDR
    forwarder: dict[str, object] = field(default_factory=dict)
    qdisc: dict[str, str] = field(default_factory=dict)

    def netns_path(self, side: str) -> str:
        """``/run/netns/...`` of the ``src`` or ``dst`` side (for setns(), as bench's C tools take)."""
        return f"/run/netns/{self.src_ns if side == 'src' else self.dst_ns}"

    def exec_in(self, side: str) -> list[str]:
        """The prefix that runs a command on the ``src`` or ``dst`` side of the link."""
        return ["ip", "netns", "exec", self.src_ns if side == "src" else self.dst_ns]


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise LinkUnavailable(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def build_forwarder() -> Path:
    """Compiles bench/wanfwd.c into bench/build/wanfwd when it is newer than the binary."""
    exe, src = BUILD / "wanfwd", HERE / "wanfwd.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-Wall", "-pthread", "-o", str(exe), str(src)],
                           capture_output=True, text=True)
        if r.returncode:
            raise LinkUnavailable(f"compiling {src.name} failed:\n{r.stderr}")
    return exe


def check() -> None:
    """Raises LinkUnavailable, saying why, when this machine cannot make a link."""
    if os.geteuid() != 0:
        raise LinkUnavailable("an emulated link needs root (network namespaces, veth, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LinkUnavailable(f"{tool} not found (apt-get install iproute2)")


def _shape(ns: str, dev: str, spec: LinkSpec) -> None:
    """htb at the link's rate on dev's egress: a bulk class and an urgent band, each a byte FIFO."""
    rate = round(spec.rate_bps)
    urgent = max(1_000_000, round(rate * URGENT_SHARE))
    # The bucket: a millisecond at the rate, and at least two 64 KiB GSO frames.
    burst = max(2 * 65536 + 4096, round(spec.bytes_per_s / 1000))
    q = spec.queue_bytes
    tc = ("ip", "netns", "exec", ns, "tc")
    _run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20")
    _run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", f"{rate}bit",
         "ceil", f"{rate}bit", "burst", str(burst), "cburst", str(burst))
    for cls, prio, share in (("10", "0", urgent), ("20", "1", rate - urgent)):
        _run(*tc, "class", "add", "dev", dev, "parent", "1:1", "classid", f"1:{cls}", "htb", "rate", f"{share}bit",
             "ceil", f"{rate}bit", "burst", str(burst), "cburst", str(burst), "prio", prio, "quantum", "65536")
        _run(*tc, "qdisc", "add", "dev", dev, "parent", f"1:{cls}", "handle", f"{cls}:", "bfifo", "limit", str(q))
    if spec.priority:
        _run(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "tos", hex(URGENT_TOS), "0xfc", "flowid", "1:10")


@contextmanager
def emulated_link(spec: LinkSpec) -> Iterator[Link]:
    """Makes the link, yields it, and takes it all down again, whatever happens inside.

    Raises:
        LinkUnavailable: not root, a tool missing, or the kernel refused a step.
    """
    check()
    fwd_exe = build_forwarder()
    tag = f"uwan{os.getpid()}x{next(_names)}"
    link = Link(spec, f"{tag}s", f"{tag}d", f"{tag}w")
    made: list[str] = []
    fwd: subprocess.Popen[str] | None = None
    try:
        for ns in (link.src_ns, link.wire_ns, link.dst_ns):
            _run("ip", "netns", "add", ns)
            made.append(ns)
            # No IPv6 chatter (router solicitations, DAD) on the link: only the migration's frames.
            _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                 "net.ipv6.conf.default.disable_ipv6=1")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", "s0", "netns", link.src_ns, "type", "veth", "peer", "name", "ws", "netns",
             link.wire_ns)
        _run("ip", "link", "add", "d0", "netns", link.dst_ns, "type", "veth", "peer", "name", "wd", "netns",
             link.wire_ns)
        _run("ip", "-n", link.src_ns, "addr", "add", f"{SRC_ADDR}/24", "dev", "s0")
        _run("ip", "-n", link.dst_ns, "addr", "add", f"{DST_ADDR}/24", "dev", "d0")
        for ns, dev in ((link.src_ns, "s0"), (link.dst_ns, "d0"), (link.wire_ns, "ws"), (link.wire_ns, "wd")):
            _run("ip", "-n", ns, "link", "set", dev, "up")
        for dev in ("ws", "wd"):
            _run("ip", "-n", link.wire_ns, "link", "set", dev, "promisc", "on")
            _shape(link.wire_ns, dev, spec)
        one_way_us = round(spec.rtt_ms * 1000 / 2)
        fwd = subprocess.Popen(["ip", "netns", "exec", link.wire_ns, str(fwd_exe), "ws", "wd", str(one_way_us)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert fwd.stdout is not None
        if fwd.stdout.readline().strip() != '{"ready": true}':
            raise LinkUnavailable(f"wanfwd did not start: {fwd.communicate(timeout=5)[1].strip()}")
        yield link
        for dev in ("ws", "wd"):
            link.qdisc[dev] = _run("ip", "netns", "exec", link.wire_ns, "tc", "-s", "class", "show", "dev", dev)
    finally:
        if fwd is not None:
            # ip netns exec has exec'd the forwarder: this pid is it.
            if fwd.poll() is None:
                fwd.send_signal(signal.SIGTERM)
            try:
                out, err = fwd.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                fwd.kill()
                out, err = fwd.communicate()
            for line in out.splitlines():
                if line.startswith("{") and "ready" not in line:
                    link.forwarder = json.loads(line)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
