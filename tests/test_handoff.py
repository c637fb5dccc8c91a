"""Firecracker's userfaultfd handoff: its messages byte for byte, every malformed variant refused in one
line, and a real handoff over a Unix socket with a real userfaultfd."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import trio

from migrate import handoff
from migrate._native import lib
from migrate.errors import PeerError, RemoteProtocolError, UsageError
from migrate.handoff import MAX_MESSAGE, MAX_REGIONS, Listener, Region, encode, parse
from migrate.uffd import Userfaultfd

MIB = 1 << 20
REGIONS = [Region(0x7F0000000000, 256 * MIB, 0), Region(0x7F0010000000, 16 * MIB, 256 * MIB)]
# What Firecracker sends for REGIONS, as serde_json::to_string writes GuestRegionUffdMapping
# (src/vmm/src/persist.rs at v1.6.0, v1.7.0 and v1.12.0): fields in declaration order, no spaces.
V1_6 = (b'[{"base_host_virt_addr":139637976727552,"size":268435456,"offset":0},'
        b'{"base_host_virt_addr":139638245163008,"size":16777216,"offset":268435456}]')
V1_7 = (b'[{"base_host_virt_addr":139637976727552,"size":268435456,"offset":0,"page_size_kib":4096},'
        b'{"base_host_virt_addr":139638245163008,"size":16777216,"offset":268435456,"page_size_kib":4096}]')
V1_12 = (b'[{"base_host_virt_addr":139637976727552,"size":268435456,"offset":0,"page_size":4096,'
         b'"page_size_kib":4096},{"base_host_virt_addr":139638245163008,"size":16777216,"offset":268435456,'
         b'"page_size":4096,"page_size_kib":4096}]')


@pytest.mark.parametrize(("version", "message"), [("1.6", V1_6), ("1.7", V1_7), ("1.12", V1_12)])
def test_firecracker_messages_byte_for_byte(version: str, message: bytes) -> None:
    assert encode(REGIONS, version) == message
    assert parse(message) == REGIONS


def test_huge_pages_from_1_7_on() -> None:
    huge = [Region(0x7F0000000000, 4 * MIB, 0, 2 * MIB)]
    assert encode(huge, "1.12") == (b'[{"base_host_virt_addr":139637976727552,"size":4194304,"offset":0,'
                                    b'"page_size":2097152,"page_size_kib":2097152}]')
    for version in ("1.7", "1.11", "1.12", "1.16"):
        assert parse(encode(huge, version)) == huge
    with pytest.raises(ValueError, match="cannot describe a page of 2097152"):
        encode(huge, "1.6")
    with pytest.raises(ValueError, match="came in 1.1"):
        encode(huge, "1.0")


def _one(**fields: object) -> bytes:
    region = {"base_host_virt_addr": 0x7F0000000000, "size": 4 * MIB, "offset": 0, "page_size": 4096,
              "page_size_kib": 4096}
    region.update(fields)
    return json.dumps([{k: v for k, v in region.items() if v is not None}]).encode()


MALFORMED = [
    (b'[{"base_host_virt_addr":1,,}]', "not JSON"),
    (b"\xff[]", "not JSON"),
    (b'{"base_host_virt_addr":0}', "not a JSON array but dict"),
    (b"[]", "0 regions"),
    (b"[1]", "region 0 is not a JSON object"),
    (_one(size=None), "region 0 has no size"),
    (_one(offset=None), "region 0 has no offset"),
    (_one(base_host_virt_addr=None), "region 0 has no base_host_virt_addr"),
    (_one(size=-4096), "region 0: size -4096 is outside 0..2^64-1"),
    (_one(offset=1 << 64), "region 0: offset 18446744073709551616 is outside 0..2^64-1"),
    (_one(offset=10**40), "region 0: offset 10000000000000000000... (41 digits) is outside"),
    (_one(size=4096.0), "region 0: size is not a whole number (4096.0)"),
    (_one(size=True), "region 0: size is not a whole number (true)"),
    (_one(size="4096"), "region 0: size is not a whole number"),
    (_one(base_host_virt_addr=0x7F0000000800), "region 0: base_host_virt_addr 0x7f0000000800 is not a multiple"),
    (_one(size=4 * MIB + 512), "region 0: size 0x400200 is not a multiple of its page size 4096"),
    (_one(offset=100), "region 0: offset 0x64 is not a multiple of its page size 4096"),
    (_one(size=0), "region 0: size is 0"),
    (_one(page_size=8192, page_size_kib=8192), "region 0: page_size 8192 is not a page size this handler serves"),
    (_one(page_size=None, page_size_kib=4), "region 0: page_size_kib 4 is not a page size"),
    (_one(page_size=2 * MIB, page_size_kib=4096), "region 0: page_size 2097152 and page_size_kib 4096 disagree"),
    (_one(base_host_virt_addr=0x7F0000100000, page_size=2 * MIB, page_size_kib=2 * MIB),
     "base_host_virt_addr 0x7f0000100000 is not a multiple of its page size 2097152"),
    (_one(base_host_virt_addr=(1 << 64) - 4096, size=8192), "region 0: base_host_virt_addr + size passes 2^64"),
    (b'[{"base_host_virt_addr":0,"size":4096,"size":8192,"offset":0}]', "the key 'size' appears twice"),
    (encode([Region(0x10000, 0x4000, 0), Region(0x12000, 0x1000, 0x4000)], "1.12"),
     "regions 0 and 1 overlap in the VMM's address space"),
    (encode([Region(0x10000, 0x4000, 0x1000), Region(0x20000, 0x1000, 0x2000)], "1.12"),
     "regions 0 and 1 overlap in the memory file (offset)"),
    (encode([Region(0x10000, 0x1000, 0), Region(0x30000, 0x1000, 0x8000), Region(0x20000, 0x1000, 0x8000)], "1.7"),
     "regions 1 and 2 overlap in the memory file"),
    (b"[" + b" " * MAX_MESSAGE + b"]", f"{MAX_MESSAGE + 2} bytes, more than the {MAX_MESSAGE}"),
    (encode([Region(i * 4096, 4096, i * 4096) for i in range(MAX_REGIONS + 1)], "1.12"), "65 regions"),
]


@pytest.mark.parametrize(("message", "error"), MALFORMED, ids=[e for _, e in MALFORMED])
def test_malformed_message_is_one_line(message: bytes, error: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse(message)
    text = str(info.value)
    assert text.startswith("the VMM's handoff message: ") and error in text
    assert "\n" not in text and info.value.hint


def test_regions_may_be_adjacent_and_unordered() -> None:
    regions = [Region(0x20000, 0x2000, 0x2000), Region(0x10000, 0x10000, 0x4000), Region(0x22000, 0x1000, 0)]
    assert parse(encode(regions, "1.12")) == regions


def test_unknown_fields_are_ignored_as_serde_does() -> None:
    assert parse(b'[{"base_host_virt_addr":4096,"size":4096,"offset":0,"future":[1,{"x":"]"}]}]') == [
        Region(4096, 4096, 0)]


# --- over a real socket -------------------------------------------------------------------------------


class Guest:
    """A registered region of this process, as a VMM has it."""

    def __init__(self, size: int = 4 * MIB) -> None:
        self.uffd = Userfaultfd(want=lib.uffd_vmm_features(lib.MEMORY_ANON))
        self.base = lib.region_map(size, lib.MEMORY_ANON)
        self.size = size
        self.uffd.register(self.base, size)

    def regions(self, n: int = 1) -> list[Region]:
        part = self.size // n
        return [Region(self.base + i * part, part, i * part) for i in range(n)]

    def close(self) -> None:
        self.uffd.close()
        lib.region_unmap(self.base, self.size)


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("regions", [1, 2])
async def test_accept_a_real_handoff(tmp_path: Path, guest: Guest, regions: int) -> None:
    path = tmp_path / "uffd.sock"
    with trio.fail_after(10):
        listener = Listener(path)
        assert path.stat().st_mode & 0o777 == 0o600
        vmm = handoff.send(path, guest.regions(regions), guest.uffd.fd, "1.12")
        got = await listener.accept(5)
        try:
            assert got.regions == guest.regions(regions) and got.pid == os.getpid()
            assert os.readlink(f"/proc/self/fd/{got.uffd}") == "anon_inode:[userfaultfd]"
            assert got.uffd != guest.uffd.fd  # a descriptor of its own
            assert not path.exists()  # one VMM: the socket file goes once it connected
            vmm.close()
            assert await got.conn.recv(1) == b""  # the VMM's hangup is how the handler learns it is gone
        finally:
            got.close()
            vmm.close()


async def test_a_message_split_in_two_writes_is_read_whole(tmp_path: Path, guest: Guest) -> None:
    path = tmp_path / "uffd.sock"
    message = encode(guest.regions(), "1.7")
    with trio.fail_after(10):
        listener = Listener(path)
        vmm = socket.socket(socket.AF_UNIX)
        vmm.connect(str(path))
        socket.send_fds(vmm, [message[:10]], [guest.uffd.fd])

        async def the_rest() -> None:
            await trio.sleep(0.1)
            vmm.sendall(message[10:])  # a few bytes: never blocks

        async with trio.open_nursery() as nursery:
            nursery.start_soon(the_rest)
            got = await listener.accept(5)
        assert got.regions == guest.regions()
        got.close()
        vmm.close()


async def test_a_message_dripped_a_byte_at_a_time(tmp_path: Path, guest: Guest) -> None:
    """Brackets inside strings do not end it early; the array's own closing bracket does."""
    path = tmp_path / "uffd.sock"
    r = guest.regions()[0]
    message = (f'[{{"note":"]}}[\\"]","base_host_virt_addr":{r.base},"size":{r.size},"offset":0}}]').encode()
    with trio.fail_after(10):
        listener = Listener(path)
        vmm = socket.socket(socket.AF_UNIX)
        vmm.connect(str(path))
        socket.send_fds(vmm, [message[:1]], [guest.uffd.fd])

        async def drip() -> None:
            for i in range(1, len(message)):
                await trio.sleep(0.001)
                vmm.send(message[i:i + 1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip)
            got = await listener.accept(5)
        assert got.regions == [r]
        got.close()
        vmm.close()


FD_CASES = [("none", "no descriptor came with it"), ("two", "2 descriptors came with it"),
            ("pipe", "is not a userfaultfd but pipe:"), ("nine", "more than 8 descriptors")]


@pytest.mark.parametrize(("case", "error"), FD_CASES, ids=[c for c, _ in FD_CASES])
async def test_descriptors_other_than_one_userfaultfd_are_refused(tmp_path: Path, guest: Guest, case: str,
                                                                  error: str) -> None:
    pipe = os.pipe()
    fds = {"none": [], "two": [guest.uffd.fd] * 2, "pipe": [pipe[0]], "nine": [pipe[1]] * 9}[case]
    path = tmp_path / "uffd.sock"
    before = _open_fds()
    with trio.fail_after(10):
        listener = Listener(path)
        vmm = socket.socket(socket.AF_UNIX)
        vmm.connect(str(path))
        socket.send_fds(vmm, [encode(guest.regions(), "1.12")], fds)
        with pytest.raises(RemoteProtocolError, match=error):
            await listener.accept(5)
    vmm.close()
    assert _open_fds() == before  # every descriptor received was closed
    for fd in pipe:
        os.close(fd)


async def test_a_region_the_vmm_does_not_map_is_refused(tmp_path: Path, guest: Guest) -> None:
    path = tmp_path / "uffd.sock"
    with trio.fail_after(10):
        listener = Listener(path)
        vmm = handoff.send(path, [Region(0x1000, 0x1000, 0)], guest.uffd.fd, "1.12")
        with pytest.raises(RemoteProtocolError, match=r"region 0 \[0x1000, 0x2000\) is not mapped in the VMM"):
            await listener.accept(5)
        vmm.close()


async def test_too_long_over_the_socket(tmp_path: Path, guest: Guest) -> None:
    path = tmp_path / "uffd.sock"
    with trio.fail_after(10):
        listener = Listener(path)
        vmm = socket.socket(socket.AF_UNIX)
        vmm.connect(str(path))
        socket.send_fds(vmm, [b"[" + b"[" * MAX_MESSAGE], [guest.uffd.fd])
        with pytest.raises(RemoteProtocolError, match="more than the 65536 bytes"):
            await listener.accept(5)
        vmm.close()


async def test_not_an_array_is_refused_at_once(tmp_path: Path, guest: Guest) -> None:
    path = tmp_path / "uffd.sock"
    with trio.fail_after(2):  # no wait for more: it cannot become an array
        listener = Listener(path)
        vmm = socket.socket(socket.AF_UNIX)
        vmm.connect(str(path))
        socket.send_fds(vmm, [b'{"base_host_virt_addr"'], [guest.uffd.fd])
        with pytest.raises(RemoteProtocolError, match="not a JSON array"):
            await listener.accept(5)
        vmm.close()


async def test_timeouts_and_a_vmm_that_leaves(tmp_path: Path, guest: Guest) -> None:
    path = tmp_path / "uffd.sock"
    with trio.fail_after(10):
        with pytest.raises(PeerError, match="no VMM connected to .* within 0.2 s"):
            await handoff.accept(path, 0.2)
        assert not path.exists()
        listener = Listener(path)
        vmm = socket.socket(socket.AF_UNIX)
        vmm.connect(str(path))
        vmm.sendall(b'[{"base_host_virt_addr":')
        with pytest.raises(PeerError, match="sent no whole handoff message within 0.2 s"):
            await listener.accept(0.2)
        vmm.close()
        listener = Listener(path)
        vmm = socket.socket(socket.AF_UNIX)
        vmm.connect(str(path))
        vmm.sendall(b'[{"base_host_virt_addr":')
        vmm.close()
        with pytest.raises(PeerError, match="closed the connection before its handoff message was whole"):
            await listener.accept(5)


async def test_the_socket_path(tmp_path: Path) -> None:
    path = tmp_path / "uffd.sock"
    path.write_text("")
    with pytest.raises(UsageError, match="exists and is not a socket"):
        Listener(path)
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: a handler that died
    live = Listener(path)  # replaces it
    with pytest.raises(UsageError, match="another handler listens on"):
        Listener(path)
    live.close()
    with pytest.raises(UsageError, match="cannot listen on"):
        Listener(tmp_path / ("x" * 200))


def test_send_without_a_handler(tmp_path: Path, guest: Guest) -> None:
    with pytest.raises(PeerError, match="cannot hand the userfaultfd to the page-fault handler"):
        handoff.send(tmp_path / "none.sock", guest.regions(), guest.uffd.fd, "1.12")
