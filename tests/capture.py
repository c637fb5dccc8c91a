"""What really crosses the loopback interface: a packet capture of the TCP connections to or from one port.

A test that checks what a migration puts on the wire (the stream's bytes per second under
``--max-bandwidth``, the DSCP mark of the urgent connections) reads it here rather than from the
program's own counters or socket options, which could say one thing while the packets say another.

An ``AF_PACKET`` socket on ``lo`` (root) with a classic BPF filter that keeps, of the packets the
host sends (each loopback packet is seen twice, sent and received; the sent copy alone counts it
once), only IPv4 and IPv6 TCP packets with ``port`` at either end, cut to their headers: the
capture is cheap whatever else runs on the machine, and the kernel stamps each packet when it
passes the interface, so a capture thread that runs late does not move the packets in time.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading
import time
from dataclasses import dataclass

# From <linux/if_ether.h>, <asm-generic/socket.h>, <linux/filter.h>, <linux/if_packet.h>; Python's
# socket module lacks them.
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35  # the old name's value: struct timespec in the control message
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SKF_AD_PKTTYPE = (-0x1000 + 4) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_PKTTYPE
# Enough for an IPv6 header and a TCP header with every option (40 + 60); IPv4 needs at most 120.
SNAPLEN = 128
# Deep enough for a second of the capture thread not running at the rates the tests use (each
# packet is charged its whole buffer, up to 64 KiB on lo, even cut to SNAPLEN).
RCVBUF = 64 << 20

# BPF opcodes (<linux/bpf_common.h>).
_LD, _LDX, _ALU, _JMP, _RET = 0x00, 0x01, 0x04, 0x05, 0x06
_W, _H, _B = 0x00, 0x08, 0x10
_IMM, _ABS, _IND, _MSH = 0x00, 0x20, 0x40, 0xA0
_JA, _JEQ, _RSH, _K = 0x00, 0x10, 0x70, 0x00


@dataclass(frozen=True)
class Packet:
    """One TCP packet as it crossed ``lo``."""

    t: float  # seconds (CLOCK_REALTIME), stamped by the kernel
    family: int  # socket.AF_INET or AF_INET6
    sport: int
    dport: int
    tos: int  # IPv4 TOS byte, or IPv6 traffic class: DSCP << 2 | ECN
    payload: int  # TCP payload bytes (a TSO/GSO packet whole, as lo carries it)


def _program(port: int) -> list[tuple[int, int, int, int]]:
    """The filter: the host's own IPv4/IPv6 TCP packets with ``port`` at either end, cut to SNAPLEN.

    Written with labels; jumps are resolved to the relative offsets cBPF wants.
    """
    code: list[tuple[int, str | None, str | None, int | str] | str] = [
        (_LD | _W | _ABS, None, None, SKF_AD_PKTTYPE), (_JMP | _JEQ | _K, None, "drop", PACKET_OUTGOING),
        (_LD | _B | _ABS, None, None, 0), (_ALU | _RSH | _K, None, None, 4),  # A = IP version
        (_JMP | _JEQ | _K, None, "v6", 4),
        (_LD | _B | _ABS, None, None, 9), (_JMP | _JEQ | _K, None, "drop", socket.IPPROTO_TCP),
        (_LDX | _B | _MSH, None, None, 0), (_JMP | _JA, None, None, "ports"),  # X = IHL * 4
        "v6", (_JMP | _JEQ | _K, None, "drop", 6),
        (_LD | _B | _ABS, None, None, 6), (_JMP | _JEQ | _K, None, "drop", socket.IPPROTO_TCP),  # no ext. headers on lo
        (_LDX | _W | _IMM, None, None, 40),
        "ports", (_LD | _H | _IND, None, None, 0), (_JMP | _JEQ | _K, "keep", None, port),
        (_LD | _H | _IND, None, None, 2), (_JMP | _JEQ | _K, "keep", None, port),
        "drop", (_RET | _K, None, None, 0),
        "keep", (_RET | _K, None, None, SNAPLEN),
    ]
    labels, pc = {}, 0
    for item in code:
        if isinstance(item, str):
            labels[item] = pc
        else:
            pc += 1
    out: list[tuple[int, int, int, int]] = []
    for item in code:
        if isinstance(item, str):
            continue
        op, jt, jf, k = item
        here = len(out) + 1  # jumps count from the next instruction

        def rel(label: str | None) -> int:
            return 0 if label is None else labels[label] - here

        out.append((op, rel(jt), rel(jf), rel(k) if isinstance(k, str) else k))
    return out


def _parse(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(family, sport, dport, tos, payload) of an IP packet's headers, or None if it is cut short."""
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        family, tos, ip_len, tcp = socket.AF_INET, data[1], struct.unpack_from("!H", data, 2)[0] - ihl, ihl
    else:
        family, tcp = socket.AF_INET6, 40
        tos = ((data[0] & 0x0F) << 4) | (data[1] >> 4)
        ip_len = struct.unpack_from("!H", data, 4)[0]
    if len(data) < tcp + 13:
        return None
    sport, dport = struct.unpack_from("!HH", data, tcp)
    return family, sport, dport, tos, ip_len - (data[tcp + 12] >> 4) * 4


class LoopbackCapture:
    """Captures, while in its ``with`` block, the TCP packets to or from ``port`` on ``lo`` (root).

    ``packets`` holds them in order once the block ends; ``drops`` is how many the kernel dropped
    because the capture fell behind (a test whose verdict needs every packet asserts it is 0).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.packets: list[Packet] = []
        self.drops = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoopbackCapture:
        # Protocol 0 receives nothing until bind: the filter is in place before the first packet.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        try:
            prog = _program(self.port)
            insns = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(prog), ctypes.addressof(insns)))
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind(("lo", ETH_P_ALL))
            sock.settimeout(0.05)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._read, name="capture", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._sock is not None and self._thread is not None
        time.sleep(0.05)  # the last packets are in the socket's queue: let the reader take them
        self._stop.set()
        self._thread.join(5)
        _, self.drops = struct.unpack("II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self._sock.close()

    def _read(self) -> None:
        assert self._sock is not None
        cmsg_space = socket.CMSG_SPACE(16)
        while True:
            try:
                data, ancillary, _, addr = self._sock.recvmsg(SNAPLEN, cmsg_space)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            if addr[2] != PACKET_OUTGOING:  # the filter keeps only these; a packet before it is attached
                continue
            t = next((struct.unpack("qq", d[:16]) for level, kind, d in ancillary
                      if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)
            fields = _parse(data)
            if t is not None and fields is not None:
                self.packets.append(Packet(t[0] + t[1] / 1e9, *fields))

    def between(self, a: int, b: int) -> list[Packet]:
        """The packets of the connection between ports ``a`` and ``b``, both ways."""
        return [p for p in self.packets if {p.sport, p.dport} == {a, b}]
