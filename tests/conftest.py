"""pytest's fixtures and hooks; what the tests share is in helpers.py.  No userfaultfd means
failure, never a skip: a skipped core test would hide a broken machine."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Callable, NoReturn

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
        try:
            running = proc.poll() is None
        except RuntimeError:  # it ended, and trio, whose run is over, could not close its pidfd
            running = False
        if running:
            proc.kill()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Callable[..., subprocess.CompletedProcess]:
    """Runs migrate-src or migrate-dst in this process, for their options, usage errors and help:
    ``cli("migrate-src", "--vcpus", "0")`` returns a CompletedProcess with the exit code (argparse's
    SystemExit included), stdout and stderr. Options that pass every check fail the test instead of
    migrating: nothing listens or connects."""
    from migrate import cli as commands, progress

    def migrating(*_: object, **__: object) -> NoReturn:
        raise AssertionError("the options were accepted: the command went on to migrate")

    for name in ("serve", "Destination"):  # what the commands run once their config is built
        monkeypatch.setattr(commands, name, migrating)
    monkeypatch.setenv("COLUMNS", "80")  # --help wraps as it does for a child whose output is a pipe
    mains = {"migrate-src": commands.src_main, "migrate-dst": commands.dst_main}

    def run(prog: str, *args: str) -> subprocess.CompletedProcess:
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            code = mains[prog](list(args))
        except SystemExit as exc:  # argparse: 2 for a usage error, 0 after --help
            code = exc.code
        finally:  # the command set up logging to this test's stderr, and maybe --no-progress
            root.handlers[:] = handlers
            root.setLevel(level)
            progress.configure(None)
        out = capsys.readouterr()
        return subprocess.CompletedProcess([prog, *args], code, out.out, out.err)

    return run
