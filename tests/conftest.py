"""pytest's fixtures and hooks; what the tests share is in helpers.py.  No userfaultfd means
failure, never a skip: a skipped core test would hide a broken machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import _STARTED, REPORT
from migrate.errors import MigrateError
from migrate.uffd import Userfaultfd

NO_UFFD_C = Path(__file__).parent / "no_uffd.c"


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
    subprocess.run(["cc", "-O2", "-o", str(out), str(NO_UFFD_C)], check=True)
    return out


@pytest.fixture(autouse=True)
def no_source_left_behind():
    """Kills the sources start_source started in this test and left running (see helpers._STARTED)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
