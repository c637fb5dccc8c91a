"""Firecracker's userfaultfd handoff: the one message a VMM sends the page-fault handler of its guest.

On a snapshot restore with a ``Uffd`` memory backend, Firecracker maps the guest's memory,
registers it with a new userfaultfd, connects to the handler's Unix stream socket and sends ONE
message: a JSON array with one object per guest memory region, the userfaultfd attached by
``SCM_RIGHTS`` in the same ``sendmsg``.  Nothing else is ever sent, and the VMM never closes the
socket: its hangup means the VMM is gone.  The objects are ``GuestRegionUffdMapping``
(``src/vmm/src/persist.rs``) as ``serde_json::to_string`` writes them: keys in the struct's field
order, no whitespace, integers in decimal.  Their fields by version:

- 1.1 to 1.6: ``base_host_virt_addr``, ``size``, ``offset``;
- 1.7 to 1.11: the same and ``page_size_kib``, which holds the page size in BYTES despite its name
  (4096, or 2097152 with 2 MiB huge pages);
- 1.12 on: ``base_host_virt_addr``, ``size``, ``offset``, ``page_size`` (bytes) and
  ``page_size_kib`` (the same value, deprecated, to go in 2.0).

``parse`` takes any of them; an absent page size means 4 KiB.  Every value is checked, as the
message comes from another process: a region the handler trusted wrongly would have it copy
pages over whatever that process maps there.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import trio

from .errors import PeerError, RemoteProtocolError, UsageError

# Firecracker's message is about 110 bytes a region and a VM has a handful of regions: these
# bounds are far above any real message and keep a hostile one from costing memory or time.
MAX_MESSAGE = 64 * 1024
MAX_REGIONS = 64
PAGE_SIZES = (4096, 2 * 1024 * 1024)
# Room for a few descriptors, so that a message carrying more than one is seen (and each closed)
# rather than truncated by the kernel unseen.
_MAX_FDS = 8
_HINT = "the VMM must send Firecracker's handoff message (1.1 or later): a JSON array of its memory regions"
_UFFD_LINK = "anon_inode:[userfaultfd]"


@dataclass(frozen=True)
class Region:
    """One guest memory region: its address in the VMM, its size, where its bytes start in the memory file,
    and its page size (all in bytes)."""

    base: int
    size: int
    offset: int
    page_size: int = 4096


def _version(version: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise ValueError(f"{version!r} is not a Firecracker version such as 1.12") from None
    if (major, minor) < (1, 1):
        raise ValueError(f"Firecracker {version} has no userfaultfd handoff (it came in 1.1)")
    if major > 1:  # 2.0 is to drop page_size_kib: its message is not known yet
        raise ValueError(f"Firecracker {version} is not known here (1.1 to 1.x are)")
    return major, minor


def encode(regions: Iterable[Region], version: str) -> bytes:
    """The message Firecracker ``version`` (e.g. ``"1.6"``, ``"1.7"``, ``"1.12"``) sends for ``regions``,
    byte for byte.

    Raises:
        ValueError: an unknown version, or a huge page size for a version before 1.7 (which had no huge
            pages and no field to say so).
    """
    v = _version(version)
    out = []
    for r in regions:
        fields: dict[str, int] = {"base_host_virt_addr": r.base, "size": r.size, "offset": r.offset}
        if v >= (1, 12):
            fields["page_size"] = r.page_size
        if v >= (1, 7):
            fields["page_size_kib"] = r.page_size  # bytes, as Firecracker fills it
        elif r.page_size != 4096:
            raise ValueError(f"Firecracker {version} cannot describe a page of {r.page_size} bytes")
        out.append(fields)
    return json.dumps(out, separators=(",", ":")).encode()


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"the VMM's handoff message: {message}", hint=_HINT)


def _show(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's keys, each once: serde would refuse a repeated field, and a second value must not win."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def _integer(i: int, obj: dict[str, Any], name: str) -> int:
    if name not in obj:
        raise _bad(f"region {i} has no {name}")
    value = obj[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"region {i}: {name} is not a whole number ({json.dumps(value)[:40]})")
    if not 0 <= value < 1 << 64:
        raise _bad(f"region {i}: {name} {_show(value)} is outside 0..2^64-1")
    return value


def _region(i: int, obj: Any) -> Region:
    if not isinstance(obj, dict):
        raise _bad(f"region {i} is not a JSON object")
    base, size, offset = (_integer(i, obj, name) for name in ("base_host_virt_addr", "size", "offset"))
    pages = {name: _integer(i, obj, name) for name in ("page_size", "page_size_kib") if name in obj}
    if len(set(pages.values())) > 1:
        raise _bad(f"region {i}: page_size {pages['page_size']} and page_size_kib {pages['page_size_kib']} disagree "
                   "(both hold the page size in bytes)")
    page = next(iter(pages.values()), 4096)
    if page not in PAGE_SIZES:
        name = next(iter(pages))
        raise _bad(f"region {i}: {name} {_show(page)} is not a page size this handler serves (4096 or 2097152)")
    if size == 0:
        raise _bad(f"region {i}: size is 0")
    for name, value in (("base_host_virt_addr", base), ("size", size), ("offset", offset)):
        if value % page:
            raise _bad(f"region {i}: {name} {value:#x} is not a multiple of its page size {page}")
    for name, value in (("base_host_virt_addr", base), ("offset", offset)):
        if value + size > 1 << 64:
            raise _bad(f"region {i}: {name} + size passes 2^64")
    return Region(base, size, offset, page)


def _disjoint(regions: list[Region], start: str, what: str) -> None:
    """Fails when two regions overlap by ``start`` (``base`` or ``offset``) and ``size``."""
    order = sorted(range(len(regions)), key=lambda i: getattr(regions[i], start))
    for a, b in zip(order, order[1:]):
        if getattr(regions[a], start) + regions[a].size > getattr(regions[b], start):
            raise _bad(f"regions {min(a, b)} and {max(a, b)} overlap in {what}")


def parse(data: bytes) -> list[Region]:
    """The regions of a handoff message of any Firecracker version, every field checked.

    Raises:
        RemoteProtocolError: one line naming the region and the field: too long, not UTF-8 JSON, not
            an array of 1 to 64 objects, a field missing or not an integer of 0..2^64-1, a page size
            other than 4096 or 2 MiB (or ``page_size`` and ``page_size_kib`` disagreeing), a base,
            size or offset not aligned to the page, an empty region, or regions that overlap in the
            VMM's address space or in the memory file.
    """
    if len(data) > MAX_MESSAGE:
        raise _bad(f"{len(data)} bytes, more than the {MAX_MESSAGE} this handler reads")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:  # json's errors are ValueErrors
        raise _bad(f"not JSON: {exc}") from None
    if not isinstance(doc, list):
        raise _bad(f"not a JSON array but {type(doc).__name__}")
    if not 1 <= len(doc) <= MAX_REGIONS:
        raise _bad(f"{len(doc)} regions; this handler takes 1 to {MAX_REGIONS}")
    regions = [_region(i, obj) for i, obj in enumerate(doc)]
    _disjoint(regions, "base", "the VMM's address space")
    _disjoint(regions, "offset", "the memory file (offset)")
    return regions


class _ArrayEnd:
    """Finds where a JSON array that arrives in pieces closes: its brackets balance, strings skipped.

    Fed each piece once (a VMM dripping a byte at a time costs one pass in all, not one per byte).
    """

    def __init__(self) -> None:
        self.started = False
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, chunk: bytes) -> bool:
        """Whether the array closed within ``chunk``.

        Raises:
            RemoteProtocolError: the message does not start as an array.
        """
        if not self.started:
            chunk = chunk.lstrip()
            if not chunk:
                return False
            if chunk[:1] != b"[":
                raise _bad("not a JSON array")
            self.started = True
        for byte in chunk:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif byte == 0x5C:  # backslash
                    self.escaped = True
                elif byte == 0x22:  # quote
                    self.in_string = False
            elif byte == 0x22:
                self.in_string = True
            elif byte in b"[{":
                self.depth += 1
            elif byte in b"]}":
                self.depth -= 1
                if self.depth == 0:
                    return True
        return False


@dataclass
class Handoff:
    """What a VMM handed over: its userfaultfd, its regions, its pid, and the connection (kept open: the
    VMM never closes it, so its hangup means the VMM is gone)."""

    uffd: int
    regions: list[Region]
    pid: int
    conn: trio.socket.SocketType

    def close(self) -> None:
        """Closes the userfaultfd and the connection (once; again does nothing)."""
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
        self.conn.close()


class Listener:
    """A Unix stream socket at ``path``, mode 0600, for one VMM to connect to.

    A socket file left at ``path`` by a handler that is gone (nothing accepts on it) is replaced.
    Listen first, then start the VMM (Firecracker connects once, without retrying); close it inside
    ``trio.run``, as any trio socket.

    Raises:
        UsageError: ``path`` exists and is not a stale socket, or cannot be bound.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        _clear_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: no moment where another user may connect
        try:
            sock.bind(self.path)
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {self.path}: {exc.strerror}",
                             hint="give a path in a directory you may write to, under 108 bytes") from None
        finally:
            os.umask(old)
        self.sock = trio.socket.from_stdlib_socket(sock)

    async def accept(self, timeout: float) -> Handoff:
        """Accepts one VMM and reads its message and userfaultfd, all within ``timeout`` seconds; then stops
        listening (the socket file is removed).

        Raises:
            PeerError: no VMM connected, or its message did not come whole, within the timeout; or it
                closed the connection first.
            RemoteProtocolError: the message or what came with it is wrong (see ``parse``): no descriptor,
                more than one, one that is not a userfaultfd, or a region the VMM does not map.
            UsageError: the VMM runs as another user, or its memory map cannot be read.

        **Cancellation**: closes the listener and whatever was received; nothing is left open.
        """
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                conn, _ = await self.sock.accept()
        except trio.TooSlowError:
            raise PeerError(f"no VMM connected to {self.path} within {timeout:g} s",
                            hint=f"start the VMM's restore with its memory backend at {self.path}") from None
        finally:
            self.close()
        fds: list[int] = []
        try:
            pid, uid = _peer(conn)
            if uid not in (os.getuid(), 0):
                raise UsageError(f"the VMM (pid {pid}) runs as uid {uid}, not as this handler's uid {os.getuid()}",
                                 hint="run the page-fault handler as the VMM's user")
            try:
                with trio.fail_at(deadline):
                    data = await _receive(conn, fds)
            except trio.TooSlowError:
                raise PeerError(f"the VMM (pid {pid}) sent no whole handoff message within {timeout:g} s",
                                hint="is the peer a VMM restoring a snapshot with a Uffd memory backend?") from None
            regions = parse(data)
            if len(fds) != 1:
                raise _bad(f"{'no descriptor' if not fds else f'{len(fds)} descriptors'} came with it, not one "
                           "userfaultfd")
            _check_uffd(fds[0])
            _check_mapped(regions, pid)
        except BaseException:
            for fd in fds:
                os.close(fd)
            conn.close()
            raise
        return Handoff(fds[0], regions, pid, conn)

    def close(self) -> None:
        """Stops listening and removes the socket file."""
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


async def accept(path: str | os.PathLike[str], timeout: float) -> Handoff:
    """Listens at ``path``, accepts one VMM and returns its handoff: ``Listener(path).accept(timeout)``."""
    return await Listener(path).accept(timeout)


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket", hint="give a path that does not exist")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: what a handler that died leaves behind
        return
    except OSError as exc:
        raise UsageError(f"{path} is a socket that cannot be checked: {exc.strerror}",
                         hint="remove it, or give another path") from None
    finally:
        probe.close()
    raise UsageError(f"another handler listens on {path}", hint="give another path, or stop that handler")


def _peer(conn: trio.socket.SocketType) -> tuple[int, int]:
    """(pid, uid) of the connected peer, as the kernel recorded them at its connect."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    return pid, uid


async def _receive(conn: trio.socket.SocketType, fds: list[int]) -> bytes:
    """Reads until the message is a whole JSON array, adding every descriptor that comes to ``fds``.

    Firecracker writes it in one ``sendmsg``; reading on until the array closes also takes one that a
    stream socket split.
    """
    data, end = bytearray(), _ArrayEnd()  # appended in place: a drip costs no copy per byte
    while True:
        chunk, ancdata, flags, _ = await conn.recvmsg(MAX_MESSAGE + 1 - len(data), socket.CMSG_SPACE(_MAX_FDS * 4),
                                                       socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
        if flags & socket.MSG_CTRUNC:
            raise _bad(f"more than {_MAX_FDS} descriptors came with it, not one userfaultfd")
        if not chunk:
            raise PeerError("the VMM closed the connection before its handoff message was whole")
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise _bad(f"more than the {MAX_MESSAGE} bytes this handler reads")
        if end.feed(chunk):
            return bytes(data)


def _check_uffd(fd: int) -> None:
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise _bad(f"cannot tell what its descriptor is: {exc.strerror}") from None
    if link != _UFFD_LINK:
        raise _bad(f"the descriptor that came with it is not a userfaultfd but {link}")


def _check_mapped(regions: list[Region], pid: int) -> None:
    """Fails unless every region lies in memory the VMM maps (``/proc/PID/maps``, adjacent mappings joined)."""
    path = f"/proc/{pid}/maps"
    try:
        with open(path) as f:
            spans = sorted(tuple(int(x, 16) for x in line.split(maxsplit=1)[0].split("-")) for line in f)
    except OSError as exc:
        raise UsageError(f"cannot read {path} to check the VMM's regions: {exc.strerror}",
                         hint="run the page-fault handler as the VMM's user") from None
    joined: list[list[int]] = []
    for start, end in spans:
        if joined and joined[-1][1] == start:
            joined[-1][1] = end
        else:
            joined.append([start, end])
    for i, r in enumerate(regions):
        if not any(start <= r.base and r.base + r.size <= end for start, end in joined):
            raise _bad(f"region {i} [{r.base:#x}, {r.base + r.size:#x}) is not mapped in the VMM (pid {pid})")


def send(path: str | os.PathLike[str], regions: list[Region], uffd: int, version: str) -> socket.socket:
    """What the VMM does: connects to the handler at ``path`` and sends the message of Firecracker
    ``version`` with ``uffd`` attached, in one ``sendmsg``.

    Returns:
        The connection, which the caller keeps open for as long as the guest runs (closing it tells
        the handler the VMM is gone).

    Raises:
        PeerError: the handler is not listening there, or took the message short.
    """
    message = encode(regions, version)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
        sent = socket.send_fds(sock, [message], [uffd])
    except OSError as exc:
        sock.close()
        raise PeerError(f"cannot hand the userfaultfd to the page-fault handler at {path}: {exc.strerror}",
                        hint="start the handler first (migrate-dst --handoff PATH)") from None
    if sent != len(message):
        sock.close()
        raise PeerError(f"the page-fault handler at {path} took {sent} of the message's {len(message)} bytes")
    return sock
