"""Shared fixtures.  No userfaultfd means failure, never a skip: a skipped core
test would hide a broken machine."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from migrate.errors import MigrateError
from migrate.uffd import Userfaultfd

BIN = Path(sys.executable).parent
HELPERS = Path(__file__).parent / "helpers"
# Lines tests want shown at the end of the run (e.g. how many races the kernel absorbed).
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    if REPORT:
        terminalreporter.section("uffd-migrate figures")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def userfaultfd_available() -> None:
    try:
        Userfaultfd().close()
    except MigrateError as exc:
        pytest.fail(f"userfaultfd is unavailable on this machine: {exc}; hint: {exc.hint}", pytrace=False)


@pytest.fixture(scope="session")
def no_uffd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wrapper that runs a command with userfaultfd forbidden by seccomp, as in a container."""
    out = tmp_path_factory.mktemp("helpers") / "no_uffd"
    subprocess.run(["cc", "-O2", "-o", str(out), str(HELPERS / "no_uffd.c")], check=True)
    return out


@dataclass
class Run:
    """What one migration left behind."""

    src_rc: int
    dst_rc: int
    src_metrics: dict
    dst_metrics: dict
    src_err: str
    dst_err: str


async def migrate(tmp: Path, src_args: list[str], dst_args: tuple[str, ...] | list[str] = (),
                  timeout: float = 180) -> Run:
    """Runs migrate-src and migrate-dst as real processes on 127.0.0.1 and collects what they report."""
    ready, src_m, dst_m = tmp / "ready", tmp / "src.json", tmp / "dst.json"
    for f in (ready, src_m, dst_m):
        f.unlink(missing_ok=True)
    src_cmd = [str(BIN / "migrate-src"), "--listen", "127.0.0.1:0", "--ready-file", str(ready),
               "--metrics", str(src_m), *src_args]
    rcs: dict[str, int] = {}
    with trio.fail_after(timeout), open(tmp / "src.err", "w") as src_err, open(tmp / "dst.err", "w") as dst_err:
        async with trio.open_nursery() as nursery:
            async def run(name: str, cmd: list[str], err: object) -> None:
                proc = await trio.run_process(cmd, check=False, stdout=subprocess.DEVNULL, stderr=err)
                rcs[name] = proc.returncode

            nursery.start_soon(run, "src", src_cmd, src_err)
            while not ready.exists() or not ready.read_text().strip():
                if "src" in rcs:
                    break
                await trio.sleep(0.05)
            if "src" not in rcs:
                dst_cmd = [str(BIN / "migrate-dst"), "--connect", ready.read_text().strip(),
                           "--metrics", str(dst_m), *dst_args]
                nursery.start_soon(run, "dst", dst_cmd, dst_err)
    load = lambda f: json.loads(f.read_text()) if f.exists() else {}  # noqa: E731
    return Run(rcs["src"], rcs.get("dst", -1), load(src_m), load(dst_m),
               (tmp / "src.err").read_text(), (tmp / "dst.err").read_text())
