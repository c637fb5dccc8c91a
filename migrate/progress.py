"""A throttled one-line progress display on a terminal; silent elsewhere (CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """Rewrites one status line on ``stream`` at most every ``interval`` seconds, if it is a TTY."""

    def __init__(self, stream: IO[str] = sys.stderr, interval: float = 0.25, enabled: bool | None = None) -> None:
        self.stream = stream
        self.interval = interval
        self.enabled = stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._shown = False

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        """Ends the status line so that the next log line starts clean."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
