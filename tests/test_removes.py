"""A VMM's removes (UFFD_EVENT_REMOVE) against the placers, at the level of the native loops.

``tests/native/remove_race.c`` plays a VMM that removes every page of its memory in turn while the
bulk placer places the image's bytes from where it removes next, and the fault reader records the
events.  Each remove must read as zeros: a page holding the image's bytes after its remove is the
race the lock around read() and the placements prevents (``plane_track_removes`` in
native/dataplane.h).  With that lock taken after read() instead, 191 to 557 of 16384 pages were
stale in each of three runs; with it, none.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import REPORT

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["stats.c", "wire.c", "uffd.c", "dataplane.c", "dirty.c", "guest.c", "link.c"]


def test_no_page_keeps_the_image_s_bytes_after_the_vmm_removed_it(tmp_path: Path) -> None:
    exe = tmp_path / "remove_race"
    subprocess.run(["cc", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'native'}", "-o", str(exe),
                    str(ROOT / "tests/native/remove_race.c"), *(str(ROOT / "native" / s) for s in SOURCES),
                    "-lssl", "-lcrypto", "-lpthread"], check=True, timeout=120)
    for _ in range(3):
        run = subprocess.run([str(exe), "16384", "10"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert ", 0 with the image's bytes" in run.stdout
    REPORT.append(run.stdout.strip())
