"""What the thin scripts in scripts/ (bench, bench-modes, bench-links) share: run a bench module's main().

A bench replays guests and imports the project (``bench/benchlib.py``, which
reads the page size from the native module), so it runs under the venv where
uffd-migrate is installed: ``--python``'s interpreter when given, else
``.venv/bin/python``.  A script calls::

    run("refbench", install=True)

Standard library only: this runs under whatever ``python3`` started the
script, before the re-exec.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = ROOT / ".venv"
_MARK = "UFFD_MIGRATE_BENCH_PYTHON"


def interpreter(argv: list[str]) -> Path:
    """The interpreter the bench runs under: ``--python PATH`` (or ``--python=PATH``), else .venv's."""
    for i, arg in enumerate(argv):
        if arg == "--python" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--python="):
            return Path(arg.split("=", 1)[1])
    return VENV / "bin" / "python"


def install() -> None:
    """Creates .venv and installs the project into it, the way scripts/demo does on a fresh clone."""
    print("installing uffd-migrate into .venv (once)...", file=sys.stderr, flush=True)
    if not (VENV / "bin" / "python").exists():
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", str(ROOT)], check=True)


def run(module: str, *, install_missing: bool = False) -> NoReturn:
    """Re-executes the calling script under the bench's interpreter if needed, then exits with ``module.main()``.

    Args:
        module: a module in bench/ with a ``main() -> int``.
        install_missing: with no ``--python``, install the project into .venv first when it has no migrate-src.
    """
    argv = sys.argv[1:]
    python = interpreter(argv)
    if install_missing and python == VENV / "bin" / "python" and not (VENV / "bin" / "migrate-src").exists():
        install()
    if not python.exists():
        prog = Path(sys.argv[0]).name
        print(f"{prog}: error: {python} not found\n{prog}: hint: scripts/test creates .venv and installs "
              "uffd-migrate into it (or pass --python <venv>/bin/python)", file=sys.stderr)
        sys.exit(2)
    # Once: the mark says this process is already the re-executed one (a venv's python is a link to
    # the system's, so comparing the paths of the interpreters would not tell).
    if os.environ.get(_MARK) != str(python):
        os.environ[_MARK] = str(python)
        os.execv(str(python), [str(python), sys.argv[0], *argv])
    sys.path.insert(0, str(HERE))
    sys.exit(importlib.import_module(module).main())
