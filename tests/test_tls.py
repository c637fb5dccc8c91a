"""Mutual TLS 1.3 on every connection: migrations verify, keys update, and every rejection is one line;
the native link never answers a send with 0 bytes.

Certificates are made at test time (trustme); real processes, real sockets on 127.0.0.1, or one
process with a socketpair whose peer is Python's ssl module (TlsPair).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import errno
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import trio

from helpers import REPORT, Pki, Side, TlsPair, migrate, run_destination, sender, start_source, thread_cpu_seconds
from migrate._native import ffi, lib
from migrate.errors import PeerError
from migrate.guest import Guest, GuestSpec
from migrate.loops import run_native
from migrate.stats import DestinationStats
from migrate.uffd import PAGE_SIZE
from proxy import CuttingProxy

GUEST = ["--guest-mib", "16", "--workload", "uniform", "--run-before", "0.2"]
DST = ["--verify", "--run-after", "0.1"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    return Pki(d)


def one_line(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1, err
    for w in words:
        assert w in err, err


async def test_tls_migration_verifies_and_reports_the_cipher(tmp_path: Path, pki: Pki) -> None:
    run = await migrate(tmp_path, [*GUEST, *pki.args("src")], [*DST, *pki.args("dst")])
    assert run.dst_rc == 0 and run.src_rc == 0, run.dst_err + run.src_err
    m = run.dst_metrics
    assert m.verified is True and m.faults > 0
    assert m.tls.startswith("TLSv1.3") and run.src_metrics.tls.startswith("TLSv1.3")
    REPORT.append(f"tls: {m.tls}, 16 MiB verified, {m.faults} faults, stall p50 "
                  f"{m.vcpu_stall_us.p50:.0f} µs")


async def test_keys_update_every_mib_and_the_migration_still_verifies(tmp_path: Path, pki: Pki) -> None:
    rekey = ["--tls-rekey-bytes", str(1 << 20)]
    run = await migrate(tmp_path, ["--guest-mib", "64", "--workload", "uniform", "--zero-fraction", "0",
                                   "--run-before", "0.2", *pki.args("src"), *rekey],
                        [*DST, *pki.args("dst"), *rekey])
    assert run.dst_rc == 0 and run.src_rc == 0, run.dst_err + run.src_err
    assert run.dst_metrics.verified is True
    assert run.src_metrics.tls_rekeys >= 60  # 64 MiB of stream alone
    # The destination sends requests and a few control frames: less than a MiB, so no key update.
    assert run.dst_metrics.tls_rekeys == 0 and run.dst_metrics.bytes_requests < 1 << 20
    REPORT.append(f"tls: a key update every MiB, {run.src_metrics.tls_rekeys} by the source, "
                  f"{run.dst_metrics.tls_rekeys} by the destination; verified")


async def reject(tmp_path: Path, src_args: list[str], dst_args: list[str]) -> tuple[int, str, str]:
    """Runs a destination that must be refused; returns its exit code, its stderr, and the source's."""
    with trio.fail_after(60):
        src, port = await start_source(tmp_path, [*GUEST, *src_args])
        try:
            rc, err, _ = await run_destination(tmp_path, port, ["--connect-timeout", "3", *dst_args])
        finally:
            src.kill()
            await src.wait()
    return rc, err, (tmp_path / "src.err").read_text()


async def test_a_source_certificate_from_another_ca_is_refused(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "other").mkdir()
    stranger = Pki(tmp_path / "other")
    rc, err, src_err = await reject(tmp_path, pki.args("src"), stranger.args("dst"))
    assert rc == 1
    one_line(err, "certificate verify failed", "hint:")
    assert "rejected" in src_err and "Traceback" not in src_err


async def test_a_refused_destination_retrying_leaves_the_source_serving_without_spinning(tmp_path: Path,
                                                                                        pki: Pki) -> None:
    """A destination refused for its certificate, trying again: the source tells it nothing more on a
    failed TLS session (a send there once returned 0 and its trio thread spun for ever) and serves the
    legitimate destination that comes next."""
    (tmp_path / "other").mkdir()
    stranger = Pki(tmp_path / "other")
    with trio.fail_after(120):
        src, port = await start_source(tmp_path, [*GUEST, *pki.args("src")])
        for _ in range(3):
            rc, err, _ = await run_destination(tmp_path, port, ["--connect-timeout", "1", *stranger.args("dst")])
            assert rc == 1 and "Traceback" not in err, err
        busy = await thread_cpu_seconds(src.pid, src.pid, over=1.0)
        rc, err, raw = await run_destination(tmp_path, port, [*DST, *pki.args("dst")])
        src_rc = await src.wait()
    src_err = (tmp_path / "src.err").read_text()
    assert busy < 0.3, f"the source's trio thread used {busy:.2f} s of CPU in 1 s while idle"
    assert rc == 0, err
    assert DestinationStats.from_json(raw).verified is True
    assert src_rc == 0 and "Traceback" not in src_err, src_err


async def test_an_expired_destination_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    pki.issue("dst", "migrate-dst", not_before=past, not_after=past + datetime.timedelta(days=1))
    rc, err, src_err = await reject(tmp_path, pki.args("src"), pki.args("dst"))
    assert rc == 1
    one_line(err, "TLS")
    assert "certificate has expired" in src_err and "Traceback" not in src_err


async def test_a_plaintext_destination_is_told_the_source_requires_tls(tmp_path: Path, pki: Pki) -> None:
    rc, err, src_err = await reject(tmp_path, pki.args("src"), [])
    assert rc == 1
    one_line(err, "this source requires TLS")
    assert "plaintext destination" in src_err and "Traceback" not in src_err


async def test_a_tls_destination_against_a_plaintext_source_is_one_line(tmp_path: Path, pki: Pki) -> None:
    rc, err, src_err = await reject(tmp_path, [], pki.args("dst"))
    assert rc == 1
    one_line(err, "wrong version number", "hint:")
    assert "speaks TLS" in src_err and "Traceback" not in src_err


async def test_a_certificate_for_another_host_is_refused(tmp_path: Path, pki: Pki) -> None:
    pki.issue("src", "elsewhere.example")
    rc, err, _ = await reject(tmp_path, pki.args("src"), pki.args("dst"))
    assert rc == 1
    one_line(err, "certificate verify failed")


def test_tls_without_its_files_is_a_usage_error(cli) -> None:
    for prog, extra in (("migrate-src", ["--listen", "127.0.0.1:0"]), ("migrate-dst", ["--connect", "127.0.0.1:9"])):
        for args in (["--tls"], ["--tls-cert", "x.pem"]):
            proc = cli(prog, *extra, *args)
            assert proc.returncode in (1, 2), proc.stderr
            one_line(proc.stderr, "TLS needs", "hint:")


async def test_a_tls_migration_recovers_from_a_cut_link(tmp_path: Path, pki: Pki) -> None:
    """Every reconnection is a new TLS handshake on each connection; the guest still verifies."""
    guest_bytes = 64 << 20
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            src, port = await start_source(tmp_path, ["--guest-mib", "64", "--zero-fraction", "0", "--workload",
                                                      "uniform", "--run-before", "0.2", *pki.args("src")])
            proxy = CuttingProxy(port, [guest_bytes // 2], lambda _: proxy.cut())
            proxy_port = await nursery.start(proxy.serve)
            rc, err, raw = await run_destination(tmp_path, proxy_port, [*DST, *pki.args("dst")])
            src_rc = await src.wait()
            nursery.cancel_scope.cancel()
    assert rc == 0 and src_rc == 0, err + (tmp_path / "src.err").read_text()
    m = DestinationStats.from_json(raw)
    assert m.verified is True and len(m.recoveries) == 1 and m.tls.startswith("TLSv1.3")


@pytest.mark.parametrize("mode", ["hybrid", "precopy"])
async def test_tls_in_the_precopy_modes(tmp_path: Path, pki: Pki, mode: str) -> None:
    """Rounds, replacements and discards travel the same TLS connections; the guest verifies."""
    run = await migrate(tmp_path, ["--guest-mib", "32", "--workload", "uniform", "--rate", "20000", "--run-before",
                                   "0.2", "--mode", mode, *pki.args("src")], [*DST, *pki.args("dst")])
    assert run.dst_rc == 0 and run.src_rc == 0, run.dst_err + run.src_err
    m = run.dst_metrics
    assert m.verified is True and m.mode == mode and m.tls.startswith("TLSv1.3")
    assert len(run.src_metrics.rounds) >= 2


# -- the native link over TLS: one process, a socketpair, Python's ssl module as the peer --------
@pytest.fixture(params=["close_notify", "abrupt"])
def closed_tls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TlsPair]:
    """A TLS link whose peer has gone (with a close_notify first, or without) and whose end our link
    has read: OpenSSL then answers a write with 0 bytes and no error."""
    t = TlsPair(tmp_path)
    try:
        if request.param == "close_notify":
            t.close_notify()
        t.theirs.close()
        buf = ffi.new("char[]", 64)
        assert lib.link_recv(t.link, buf, 64, t.want, t.why) == 0  # the peer's end, a clean EOF
        yield t
    finally:
        t.close()


def test_a_send_after_the_tls_peer_closed_is_an_error_never_zero(closed_tls: TlsPair) -> None:
    """link.h: a send returns bytes sent, -EAGAIN or -errno, never 0, which every caller would take
    for "call again at once" and spin on."""
    buf = ffi.new("char[]", 4096)
    for _ in range(2):
        assert lib.link_send(closed_tls.link, buf, 4096, closed_tls.want, closed_tls.why) == -errno.EPIPE
        assert closed_tls.text() == "TLS send: the peer closed the connection"


@contextmanager
def rescued(sock_fd: int) -> Iterator[None]:
    """Should a loop spin on sends that move nothing (the defect the tests below catch), /dev/null
    replaces its socket after 5 s: its writes then succeed, the loop ends, and the test fails rather
    than hangs."""
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    timer = threading.Timer(5, os.dup2, (devnull, sock_fd))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        os.close(devnull)


async def test_the_streamer_ends_with_an_error_when_the_tls_peer_has_closed(closed_tls: TlsPair) -> None:
    """src_stream_runs (flush) returns the link's error instead of calling again at once."""
    guest = Guest(GuestSpec(pages=64, vcpus=1), fill=True)
    runs = ffi.new("struct wire_run[]", [{"start": 0, "count": 64}])
    try:
        with rescued(closed_tls.ours.fileno()), trio.fail_after(10), \
                pytest.raises(PeerError, match="TLS send: the peer closed the connection"):
            await sender(guest.base, 64, closed_tls.link, ffi.new("send_stats_t *")).run(runs, 1, 0,
                                                                                      peer="destination")
    finally:
        guest.close()


async def test_the_fault_reader_ends_with_an_error_when_the_tls_peer_has_closed(closed_tls: TlsPair) -> None:
    """dst_fault_loop (send_all) returns the link's error instead of calling again at once."""
    side = Side(16)
    try:
        async with trio.open_nursery() as nursery:
            # A vCPU's access to page 0: a fault, so a request to send.
            nursery.start_soon(trio.to_thread.run_sync, lib.guest_digest, side.guest.base, 1)
            try:
                with rescued(closed_tls.ours.fileno()), trio.fail_after(10), \
                        pytest.raises(PeerError, match="TLS send: the peer closed the connection"):
                    await run_native(lib.dst_fault_loop, side.plane, closed_tls.link, 60_000, 1, peer="source")
            finally:
                side.uffd.zeropage(side.guest.base, PAGE_SIZE)  # lets the access finish
    finally:
        side.close()


def test_a_stale_openssl_error_does_not_turn_a_wait_into_a_failure(tmp_path: Path) -> None:
    """OpenSSL's error queue is per thread and shared with every other user of the library there
    (Python's ssl module too); SSL_get_error reads it first, so a call that merely would block reads as
    a protocol error unless the queue was emptied before the call."""
    crypto = ctypes.CDLL(ctypes.util.find_library("crypto"))

    def stale_error() -> None:
        crypto.ERR_new()
        crypto.ERR_set_error(20, 1, None)  # ERR_LIB_SSL, any reason: what an earlier failure leaves

    t = TlsPair(tmp_path)
    try:
        buf = ffi.new("char[]", 16384)
        stale_error()
        assert lib.link_recv(t.link, buf, 64, t.want, t.why) == -errno.EAGAIN  # nothing sent yet
        for _ in range(1000):  # nobody reads: the socket fills up
            stale_error()
            n = lib.link_send(t.link, buf, 16384, t.want, t.why)
            if n < 0:
                break
        assert n == -errno.EAGAIN, t.text()
    finally:
        t.close()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    fresh = ffi.new("link_t *", {"fd": ours.fileno()})
    try:
        assert lib.tls_attach(fresh, t.config.ctx, b"127.0.0.1", t.why) == 0
        for _ in range(2):  # the hello (then waits), and waiting again
            stale_error()
            assert lib.tls_handshake(fresh, t.want, t.why) == -errno.EAGAIN, t.text()
    finally:
        lib.tls_detach(fresh)
        ours.close()
        theirs.close()


def test_each_link_keeps_its_own_error_text(tmp_path: Path) -> None:
    """A loop's error text is read by the trio thread after the worker returned, and that worker may
    have run another loop since: the text lives in the link, not in the thread."""
    t = TlsPair(tmp_path)

    def another_link_fails() -> None:
        """A handshake in this thread that a plaintext peer answers: an error with a text of its own."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        other, why = ffi.new("link_t *", {"fd": ours.fileno()}), ffi.new("char **")
        try:
            theirs.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            assert lib.tls_attach(other, t.config.ctx, b"127.0.0.1", why) == 0
            assert lib.tls_handshake(other, t.want, why) == -errno.EPROTO
            assert ffi.string(why[0]).decode().startswith("TLS handshake: ")
        finally:
            lib.tls_detach(other)
            ours.close()
            theirs.close()

    try:
        described = lib.tls_description(t.link)
        another_link_fails()
        assert ffi.string(described).decode().startswith("TLSv1.3 ")
        t.theirs.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a record that does not decrypt
        buf = ffi.new("char[]", 64)
        assert lib.link_recv(t.link, buf, 64, t.want, t.why) == -errno.EPROTO
        text = t.text()
        assert text.startswith("TLS receive: ")
        another_link_fails()
        assert t.text() == text
    finally:
        t.close()
