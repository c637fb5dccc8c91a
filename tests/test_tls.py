"""Mutual TLS 1.3 on every connection: migrations verify, keys update, and every rejection is one line.

Certificates are made at test time (trustme); real processes, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import trio

from helpers import REPORT, Pki, migrate, run_destination, start_source, thread_cpu_seconds
from migrate.stats import DestinationStats
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
    assert run.dst_metrics.tls_rekeys >= 0
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
