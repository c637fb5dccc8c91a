"""Lost links, dead peers, hostile clients, keys: real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
import trio

from helpers import REPORT, destination_against, hostile, migrate, run_destination, send_raw, start_source
from migrate import protocol as p
from migrate.cli import KEY_ENV
from migrate.errors import PeerError
from migrate.stats import DestinationStats, SourceStats
from migrate.wire import FrameSocket
from proxy import CuttingProxy

# No zero pages, so that bytes through the proxy measure the migration's progress.
BUSY_GUEST = ["--guest-mib", "256", "--zero-fraction", "0", "--workload", "uniform", "--run-before", "0.3"]
GUEST_BYTES = 256 << 20


async def test_links_cut_twice_the_migration_recovers_and_verifies(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            src, port = await start_source(tmp_path, BUSY_GUEST)
            proxy = CuttingProxy(port, [int(0.3 * GUEST_BYTES), int(0.7 * GUEST_BYTES)],
                                 lambda _: proxy.cut())
            proxy_port = await nursery.start(proxy.serve)
            rc, err, raw = await run_destination(tmp_path, proxy_port, ["--verify", "--run-after", "0.2"])
            src_rc = await src.wait()
            nursery.cancel_scope.cancel()
    assert rc == 0, err
    m = DestinationStats.from_json(raw)
    assert src_rc == 0, (tmp_path / "src.err").read_text()
    assert proxy.cuts == 2
    assert m.verified is True and m.pages_placed == m.pages_total
    assert len(m.recoveries) == 2, err
    assert SourceStats.from_json(json.loads((tmp_path / "src.json").read_text())).recoveries == 2
    assert "Traceback" not in err
    # The source streams exactly what the destination's kernel lacks at each reconnect, no page more.
    src_err = (tmp_path / "src.err").read_text()
    lacks = [int(n) for n in re.findall(r"destination back: it lacks (\d+) pages", src_err)]
    streams = [int(a) + int(b) for a, b in
               re.findall(r"stream complete: (\d+) pages in \S+ s; (\d+) more had gone on request", src_err)]
    assert lacks == [r.pages_missing for r in m.recoveries], src_err
    assert all(0 < r.pages_missing < m.pages_total for r in m.recoveries)
    assert streams == [lacks[-1]], src_err  # only the last stream ran to its end
    REPORT.append("recovery: links cut at 30% and 70%: " + ", ".join(
        f"reconnected in {r.reconnect_s * 1000:.0f} ms, {r.pages_missing} pages re-requested"
        for r in m.recoveries) + f"; verified in {m.total_s:.2f} s")


async def test_silent_partition_is_detected_and_recovered(tmp_path: Path) -> None:
    """The links go quiet without closing: the destination notices the silence, reconnects, and the
    source drops the stale channels it had not noticed were dead."""
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            src, port = await start_source(tmp_path, BUSY_GUEST)
            proxy = CuttingProxy(port, [int(0.5 * GUEST_BYTES)], lambda _: proxy.freeze())
            proxy_port = await nursery.start(proxy.serve)
            rc, err, raw = await run_destination(tmp_path, proxy_port, ["--verify", "--run-after", "0.2",
                                                                         "--link-timeout", "2"])
            src_rc = await src.wait()
            nursery.cancel_scope.cancel()
    assert rc == 0, err
    assert src_rc == 0, (tmp_path / "src.err").read_text()
    m = DestinationStats.from_json(raw)
    assert m.verified is True and len(m.recoveries) == 1
    assert "still closing" in (tmp_path / "src.err").read_text()  # the stale channels were ended
    REPORT.append(f"partition: silent links detected and recovered in {m.recoveries[0].reconnect_s:.2f} s, "
                  f"{m.recoveries[0].pages_missing} pages re-requested, verified")


async def test_source_killed_midway_destination_gives_up_clearly(tmp_path: Path) -> None:
    timeout = 3.0
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            src, port = await start_source(tmp_path, BUSY_GUEST)

            killed_at: list[float] = []

            def kill(_: int) -> None:
                src.send_signal(signal.SIGKILL)
                proxy.cut()
                killed_at.append(time.monotonic())

            proxy = CuttingProxy(port, [int(0.5 * GUEST_BYTES)], kill)
            proxy_port = await nursery.start(proxy.serve)
            rc, err, _ = await run_destination(tmp_path, proxy_port, ["--reconnect-timeout", str(timeout),
                                                                       "--watchdog", "1"])
            done = time.monotonic()
            await src.wait()
            nursery.cancel_scope.cancel()
    assert rc == 1
    assert "Traceback" not in err
    assert "unreachable" in err and "pages" in err and "hint:" in err, err
    assert "watchdog: vCPU" in err and "for page" in err  # the stuck vCPUs were named meanwhile
    assert timeout - 0.1 <= done - killed_at[0] < timeout + 20  # it tried for the whole --reconnect-timeout
    REPORT.append(f"dead source: destination gave up {done - killed_at[0]:.1f} s after the kill with: "
                  + next(line for line in err.splitlines() if "error:" in line))


def hostile_clients(port: int) -> int:
    """Garbage, an oversize length, a bad magic flood: each gets its connection closed."""
    pre = struct.pack(">4sH", p.MAGIC, p.VERSION)
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        pre + struct.pack("<IIQQII", 4, 0xFFFFFFFF, 0, 0, 0, 0),  # a control frame of 2^32-1 bytes
        pre + b"\xff" * 32,  # a frame of unknown kind
        pre + struct.pack("<IIQQII", 4, 11, 0, 0, 0, 0) + b"\x93\x08\x90\x00garbage",
    ] + [bytes(range(256))] * 20
    closed = 0
    for data in payloads:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            try:
                while s.recv(65536):
                    pass
                closed += 1
            except ConnectionResetError:
                closed += 1
    return closed


async def test_hostile_clients_and_wrong_key_are_rejected_then_a_real_destination_migrates(tmp_path: Path) -> None:
    key, wrong = tmp_path / "key", tmp_path / "wrong"
    key.write_text("correct horse battery staple\n")
    wrong.write_text("something else\n")
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            src, port = await start_source(tmp_path, [
                "--guest-mib", "64", "--key-file", str(key), "--handshake-timeout", "1", "--run-before", "0.3"])

            dripper_dropped = trio.Event()

            async def slow_drip() -> None:
                """One byte every 0.4 s, forever: the source must drop it after --handshake-timeout."""
                with trio.socket.socket() as s:
                    await s.connect(("127.0.0.1", port))
                    try:
                        while True:
                            await s.send(b"U")
                            await trio.sleep(0.4)
                    except OSError:
                        dripper_dropped.set()

            nursery.start_soon(slow_drip)
            closed = await trio.to_thread.run_sync(hostile_clients, port)
            rc_wrong, err_wrong, _ = await run_destination(tmp_path, port, ["--key-file", str(wrong)])
            with trio.fail_after(10):
                await dripper_dropped.wait()
            rc, err, raw = await run_destination(tmp_path, port, ["--key-file", str(key), "--verify",
                                                                  "--run-after", "0.2"])
            src_rc = await src.wait()
    src_err = (tmp_path / "src.err").read_text()
    assert closed == 24
    assert rc_wrong == 1 and "authentication failed" in err_wrong and "Traceback" not in err_wrong
    assert rc == 0, err
    assert DestinationStats.from_json(raw).verified is True
    assert src_rc == 0, src_err
    assert "handshake timed out" in src_err and "bad magic" in src_err and "control frame length outside" in src_err
    assert "Traceback" not in src_err
    rejected = SourceStats.from_json(json.loads((tmp_path / "src.json").read_text())).rejected_peers
    assert rejected >= 26
    REPORT.append(f"hostile: {rejected} connections rejected (garbage, oversize lengths, bad magic, slow drip, "
                  "wrong key), then the keyed destination migrated and verified")


async def test_the_key_in_the_environment_is_the_key_on_both_sides(tmp_path: Path) -> None:
    """README: "--key-file (or $MIGRATE_KEY) on both sides".  A source keyed only by $MIGRATE_KEY refuses
    a destination without a key (so the source reads it) and one whose $MIGRATE_KEY differs, each in one
    line, and keeps serving; then a destination keyed only by the same $MIGRATE_KEY migrates and
    verifies (so the destination reads it)."""
    bare = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    keyed = {**bare, KEY_ENV: "correct horse battery staple"}
    with trio.fail_after(60):
        src, port = await start_source(tmp_path, ["--guest-mib", "16", "--run-before", "0.2"], env=keyed)
        for env, which in ((bare, "no key"), ({**bare, KEY_ENV: "something else"}, "another key")):
            rc, err, _ = await run_destination(tmp_path, port, ["--verify"], env=env)
            lines = err.strip().splitlines()
            assert rc == 1 and len(lines) == 1, f"a destination with {which} was not refused in one line: {err}"
            assert lines[0].startswith("migrate-dst: error: ") and "the destination does not know the key" in lines[0]
            assert src.poll() is None, (tmp_path / "src.err").read_text()
        rc, err, raw = await run_destination(tmp_path, port, ["--verify", "--run-after", "0.2"], env=keyed)
        assert rc == 0, f"the destination with the key in ${KEY_ENV} failed: {err}"
        src_rc = await src.wait()
    src_err = (tmp_path / "src.err").read_text()
    assert src_rc == 0, src_err
    assert DestinationStats.from_json(raw).verified is True
    assert src_err.count("authentication failed: the destination does not know the key") == 2, src_err
    assert "Traceback" not in src_err + err


async def test_port_scans_resetting_before_a_word_leave_the_source_serving(tmp_path: Path) -> None:
    """nmap -sT and health checkers connect, then reset (SO_LINGER 0) or close before a word: each ends
    that connection only (a reset once ended the source with a traceback and refused the destination)."""
    with trio.fail_after(120):
        src, port = await start_source(tmp_path, ["--guest-mib", "8", "--run-before", "0.2"])
        for i in range(20):
            with trio.socket.socket() as s:
                await s.connect(("127.0.0.1", port))
                if i % 2:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    s.shutdown(socket.SHUT_WR)
            await trio.sleep(0.01)
        rc, err, raw = await run_destination(tmp_path, port, ["--verify", "--run-after", "0.1"])
        src_rc = await src.wait()
    src_err = (tmp_path / "src.err").read_text()
    assert rc == 0, err
    assert DestinationStats.from_json(raw).verified is True
    assert src_rc == 0 and "Traceback" not in src_err, src_err


async def test_a_source_that_never_begins_is_left_after_the_switchover_timeout(tmp_path: Path) -> None:
    """--switchover-timeout bounds the one wait that no link timeout covers: a live source running its
    guest (--run-before 60) without ever migrating it."""
    with trio.fail_after(60):
        src, port = await start_source(tmp_path, ["--guest-mib", "4", "--run-before", "60"])
        t0 = trio.current_time()
        rc, err, _ = await run_destination(tmp_path, port, ["--switchover-timeout", "1.5"])
        waited = trio.current_time() - t0
        src.kill()
        await src.wait()
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert rc == 1 and len(errors) == 1 and "did not begin the migration within 1.5 s" in errors[0], err
    assert "--switchover-timeout" in err and "Traceback" not in err
    assert 1.5 <= waited < 5


async def test_clean_migrations_record_no_spurious_recovery(tmp_path: Path) -> None:
    """A loop stopped by our own cancel reports "stopped", never "peer closed" (once 4 in 40 runs)."""
    runs = 40
    for _ in range(runs):
        run = await migrate(tmp_path, ["--guest-mib", "16", "--workload", "uniform", "--run-before", "0"],
                            ["--run-after", "0"], timeout=60)
        assert run.dst_rc == 0 and run.src_rc == 0, run.dst_err + run.src_err
        assert run.dst_metrics.recoveries == () and run.src_metrics.recoveries == 0, run.dst_err + run.src_err
        assert "lost" not in run.dst_err + run.src_err
    REPORT.append(f"clean runs: {runs} migrations of 16 MiB, 0 spurious recoveries")


# -- strangers on the port: they must not stop, bloat or scribble on a migration --
# A modest access rate keeps --verify's replay short after a few seconds of --run-before.
SMALL_GUEST = ["--guest-mib", "64", "--workload", "uniform", "--rate", "100000"]


def idle_flood(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that say nothing; the source closes those beyond --max-pending at once."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


async def wait_for_line(path: Path, text: str, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while text not in path.read_text():
            await trio.sleep(0.05)


async def destination_joined(nursery: trio.Nursery, tmp_path: Path, port: int) -> list:
    """Starts a verifying destination in ``nursery`` and returns once all its connections are up; the
    list it returns gets (exit code, stderr, metrics) when the destination ends."""
    result: list = []

    async def destination() -> None:
        result.extend(await run_destination(tmp_path, port, ["--verify", "--run-after", "0.2"]))

    nursery.start_soon(destination)
    await wait_for_line(tmp_path / "src.err", "replies channel up")
    return result


def assert_joined_and_verified(result: list, src_rc: int, tmp_path: Path) -> tuple[str, str, DestinationStats]:
    """Asserts that the destination destination_joined started and the source both exited 0 and that
    the guest verified; returns the destination's stderr, the source's stderr and its metrics."""
    rc, err, raw = result
    src_err = (tmp_path / "src.err").read_text()
    assert rc == 0, err
    assert src_rc == 0, src_err
    m = DestinationStats.from_json(raw)
    assert m.verified is True
    return err, src_err, m


async def test_idle_flood_beyond_the_descriptor_limit_cannot_stop_a_migration(tmp_path: Path) -> None:
    """100 idle connections against a source limited to 64 descriptors, before the destination
    arrives and again once it is in: handshakes beyond --max-pending are closed at once, the
    destination retries until a slot frees, and the migration verifies."""
    flood: list[socket.socket] = []
    try:
        with trio.fail_after(60):
            src, port = await start_source(tmp_path, [*SMALL_GUEST, "--handshake-timeout", "1", "--run-before", "3"],
                                           wrapper=["prlimit", "--nofile=64:64"])
            flood += await trio.to_thread.run_sync(idle_flood, port, 100)
            async with trio.open_nursery() as nursery:
                result = await destination_joined(nursery, tmp_path, port)
                flood += await trio.to_thread.run_sync(idle_flood, port, 100)
            src_rc = await src.wait()
    finally:
        for s in flood:
            s.close()
    err, src_err, m = assert_joined_and_verified(result, src_rc, tmp_path)
    assert "Traceback" not in err + src_err
    src_m = SourceStats.from_json(json.loads((tmp_path / "src.json").read_text()))
    assert src_m.dropped_peers >= 2 * (100 - 16)
    assert m.connect_attempts > 3  # turned away at first, then let in (a clean run opens 3 connections)
    REPORT.append(f"flood: 200 idle connections against 64 descriptors: {src_m.dropped_peers} closed at once, "
                  f"{src_m.rejected_peers} timed out; the destination got in after {m.connect_attempts - 2} "
                  "retries and verified")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def test_accept_errors_back_off_and_the_migration_goes_on(tmp_path: Path) -> None:
    """Descriptors run out under a running source (its limit lowered to what it holds): accept fails
    with EMFILE, the source says so and keeps going; once descriptors are back, it serves again."""
    with trio.fail_after(60):
        src, port = await start_source(tmp_path, [*SMALL_GUEST, "--handshake-timeout", "1", "--run-before", "3"])
        async with trio.open_nursery() as nursery:
            result = await destination_joined(nursery, tmp_path, port)
            await trio.run_process(["prlimit", f"--pid={src.pid}", f"--nofile={open_fds(src.pid)}:"])
            flood = await trio.to_thread.run_sync(idle_flood, port, 5)  # queued by the kernel, not accepted
            await wait_for_line(tmp_path / "src.err", "Too many open files")
            await trio.sleep(0.5)
            assert src.poll() is None, (tmp_path / "src.err").read_text()
            await trio.run_process(["prlimit", f"--pid={src.pid}", "--nofile=1024:"])
        src_rc = await src.wait()
        for s in flood:
            s.close()
    _, src_err, _ = assert_joined_and_verified(result, src_rc, tmp_path)
    assert "cannot accept connections (Too many open files)" in src_err and "Traceback" not in src_err
    # Once descriptors were back, the queued connections were accepted and timed out as usual.
    assert SourceStats.from_json(json.loads((tmp_path / "src.json").read_text())).rejected_peers >= 5


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_idle_connections_cost_the_source_little_memory(tmp_path: Path) -> None:
    """25 handshakes held open against a 256 MiB source: each costs a small receive buffer (the source
    never receives pages), not room for two 1 MiB frames."""
    src, port = await start_source(tmp_path, ["--guest-mib", "256", "--zero-fraction", "0", "--rate", "1",
                                              "--max-pending", "32", "--handshake-timeout", "60"])
    conns: list[socket.socket] = []

    def handshakes_under_way(count: int) -> list[socket.socket]:
        """Opens ``count`` connections, each sending a preamble and waiting for the source's Challenge:
        when it arrives, the source has set that connection up (no sleep to guess when)."""
        opened = idle_flood(port, count)
        for c in opened:
            c.sendall(p.Connection(p.Role.DESTINATION).preamble())
            assert len(c.recv(4096)) > 0
        return opened

    try:
        with trio.fail_after(60):
            # The first handshake's one-off costs (code paths touched once) belong to the baseline.
            conns = await trio.to_thread.run_sync(handshakes_under_way, 1)
            before = vm_rss_kib(src.pid)
            conns += await trio.to_thread.run_sync(handshakes_under_way, 25)
            growth_mib = (vm_rss_kib(src.pid) - before) / 1024
    finally:
        for c in conns:
            c.close()
        src.kill()
        await src.wait()
    assert growth_mib < 12, f"{growth_mib:.1f} MiB for 25 idle connections"
    REPORT.append(f"memory: 25 idle handshakes grew the source's RSS by {growth_mib:.1f} MiB")


async def test_a_peer_error_text_reaches_the_log_escaped(tmp_path: Path) -> None:
    """An unauthenticated peer's Error frame carries terminal escapes: they are logged as text, inert."""
    src, port = await start_source(tmp_path, ["--guest-mib", "1", "--vcpus", "1"])
    try:
        hostile = "\x1b[2J\x1b[31mEVIL\x07\u202e"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"".join(bytes(c) for c in p.Connection(p.Role.DESTINATION).send(p.Error(hostile))))
            while s.recv(65536):
                pass
        await wait_for_line(tmp_path / "src.err", "EVIL")
    finally:
        src.kill()
        await src.wait()
    src_err = (tmp_path / "src.err").read_text()
    assert "\x1b" not in src_err and "\x07" not in src_err and "\u202e" not in src_err
    assert r"reported: \x1b[2J\x1b[31mEVIL\x07\u202e" in src_err


# -- a peer that holds the key but breaks the rules ---------------------------
async def open_channel(port: int, channel: p.Channel, session: bytes = b"") -> tuple[FrameSocket, p.Welcome]:
    """What migrate-dst does to join (no key): returns the channel and the source's Welcome."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    fs = FrameSocket(sock, p.Connection(p.Role.DESTINATION), "source")
    await fs.send_preamble()
    challenge = await fs.expect(p.Challenge)
    nonce = p.new_nonce()
    await fs.send(p.Hello(channel, session, nonce, p.prove(b"", p.Role.DESTINATION, channel, challenge.nonce, nonce)))
    return fs, await fs.expect(p.Welcome)


async def test_resume_frames_that_never_end_are_refused(tmp_path: Path) -> None:
    """After a lost link, a destination sends Resume after Resume with more=True: past the guest's
    page count, the source stops collecting runs and ends with one line (a violation of the
    protocol is not a lost link: waiting for that destination again would only meet it again)."""
    with trio.fail_after(60):
        src, port = await start_source(tmp_path, ["--guest-pages", "256", "--vcpus", "1", "--run-before", "0",
                                                  "--reconnect-timeout", "2"])
        bulk, welcome = await open_channel(port, p.Channel.BULK)
        others = [(await open_channel(port, ch, welcome.session))[0] for ch in (p.Channel.REQUESTS, p.Channel.REPLIES)]
        await bulk.expect(p.GuestInfo)
        await bulk.expect(p.CpuState)
        for fs in (bulk, *others):
            fs.close()
        await wait_for_line(tmp_path / "src.err", "lost the destination")
        bulk, _ = await open_channel(port, p.Channel.BULK, welcome.session)
        others = [(await open_channel(port, ch, welcome.session))[0] for ch in (p.Channel.REQUESTS, p.Channel.REPLIES)]
        for _ in range(5):  # 1,000 runs of one page for a guest of 256 pages: what our own Connection refuses to send
            await send_raw(bulk.sock, hostile(p.Resume(tuple((i, 1) for i in range(200)), more=True)))
        with trio.fail_after(5), pytest.raises(PeerError):
            while True:  # stream frames may come first
                await bulk.receive()
        for fs in (bulk, *others):
            fs.close()
        src_rc = await src.wait()
    src_err = (tmp_path / "src.err").read_text()
    assert "Resume names 400 pages" in src_err and "Traceback" not in src_err
    assert src_rc == 1 and "hint: run the same uffd-migrate version on both sides" in src_err


async def test_cpu_state_for_the_wrong_number_of_vcpus_is_one_line(tmp_path: Path) -> None:
    """A source whose CPU state does not match the guest it announced: one line, no traceback."""

    async def accept(listener: trio.socket.SocketType, channel: p.Channel) -> FrameSocket:
        sock, _ = await listener.accept()
        fs = FrameSocket(sock, p.Connection(p.Role.SOURCE), "destination")
        try:
            nonce = p.new_nonce()
            await fs.send(p.Challenge(nonce))
            hello = await fs.expect(p.Hello)
            assert hello.channel is channel
            await fs.send(p.Welcome(b"s" * 16, p.prove(b"", p.Role.SOURCE, channel, nonce, hello.nonce)))
        except BaseException:
            fs.close()
            raise
        return fs

    async def wrong_source(listener: trio.socket.SocketType) -> None:
        channels = [await accept(listener, p.Channel.BULK)]
        try:
            await channels[0].send(p.GuestInfo(pages=256, vcpus=2, workload=0, seed=1, zero_permille=0, rate=0))
            channels.append(await accept(listener, p.Channel.REQUESTS))
            channels.append(await accept(listener, p.Channel.REPLIES))
            await send_raw(channels[0].sock, hostile(p.CpuState(((1, 0, 0),) * 3)))  # our Connection would refuse
            await trio.sleep_forever()
        finally:
            for fs in channels:
                fs.close()

    rc, err = await destination_against(wrong_source)
    assert rc == 1 and "Traceback" not in err, err
    assert "state of 3 vCPUs for a guest of 2" in err and "hint:" in err


async def test_a_destination_that_dies_half_way_through_joining_does_not_hold_the_source(tmp_path: Path) -> None:
    """Bulk connection opened, the others never: after --handshake-timeout the session is dropped and
    the next destination migrates."""
    with trio.fail_after(60):
        src, port = await start_source(tmp_path, ["--guest-mib", "8", "--run-before", "0", "--handshake-timeout", "1"])
        bulk, _ = await open_channel(port, p.Channel.BULK)
        bulk.close()  # and nothing more: a destination that died
        await wait_for_line(tmp_path / "src.err", "dropped a session")
        rc, err, raw = await run_destination(tmp_path, port, ["--verify", "--run-after", "0"])
        assert await src.wait() == 0
    assert rc == 0, err
    assert DestinationStats.from_json(raw).verified is True


async def test_a_silent_connection_frees_its_handshake_slot_within_a_second(tmp_path: Path) -> None:
    """A destination speaks first, at once: a connection that says nothing is closed after 1 s, not after
    --handshake-timeout, so an idle flood turns the pending slots over quickly."""
    with trio.fail_after(60):
        src, port = await start_source(tmp_path, ["--guest-mib", "1", "--vcpus", "1", "--handshake-timeout", "30"])
        try:
            with trio.socket.socket() as s:
                await s.connect(("127.0.0.1", port))
                t0 = trio.current_time()
                assert await s.recv(100) == b""  # closed by the source, without a word
                waited = trio.current_time() - t0
        finally:
            src.kill()
            await src.wait()
    assert 0.5 < waited < 5, waited
    assert "no preamble within 1 s" in (tmp_path / "src.err").read_text()
