"""The live view on a terminal: one throttled progress line, and log lines that never glue to it.

The rule: a progress line is cleared before any log line is written.  On a
terminal every log line therefore starts with ``\\r\\x1b[K`` (back to the
start of the row, clear it).  That covers both cases where a log line met a
progress line: ours (the progress redraws below the log line at once) and
another process's on the same terminal (``scripts/demo`` runs both commands
in one; that process redraws at its next update).  Off a terminal (CI,
pipes) there is no progress line and log lines are plain.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import IO, Callable

CLEAR_LINE = "\r\x1b[K"
BAR_WIDTH = 20

# Progress lines and log lines come from the trio thread and from worker
# threads; one lock keeps a line from being written in the middle of another.
_lock = threading.RLock()
_drawn: set[Progress] = set()  # progress lines on screen now, to redraw after a log line
_enabled_default: bool | None = None  # None: on when the stream is a terminal


def configure(enabled: bool | None) -> None:
    """Turns progress lines off (``False``) or back to the default, on when stderr is a TTY (``None``).

    ``--no-progress`` calls this before a side creates its Progress: two
    processes sharing a terminal would otherwise take turns drawing one row.
    """
    global _enabled_default
    _enabled_default = enabled


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def write_line(text: str, stream: IO[str] | None = None) -> None:
    """Writes one line (a log line, an error) so that it never glues to a progress line.

    On a terminal the line clears the row first (a progress line of this
    process or another), and this process's progress line is redrawn under it.
    """
    stream = sys.stderr if stream is None else stream
    with _lock:
        if _isatty(stream):
            stream.write(CLEAR_LINE + text + "\n")
            stream.flush()
            for progress in list(_drawn):
                if progress.stream is stream:
                    progress.redraw()
        else:
            stream.write(text + "\n")
            stream.flush()


def finish_all() -> None:
    """Ends every progress line still drawn, keeping its figures: before an error ends the process."""
    with _lock:
        for progress in list(_drawn):
            progress.finish()


class LogHandler(logging.StreamHandler):
    """The commands' logging handler: every record becomes one ``write_line``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record), self.stream)
        except Exception:  # logging's contract: never raise from emit
            self.handleError(record)


class Progress:
    """Rewrites one status line on ``stream`` at most every ``interval`` seconds, if it is a TTY.

    Args:
        stream: where to draw (default: ``sys.stderr`` at construction).
        interval: seconds between redraws.
        enabled: force on or off; ``None`` follows ``configure`` and else
            whether ``stream`` is a terminal.
    """

    def __init__(self, stream: IO[str] | None = None, interval: float = 0.25, enabled: bool | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        if enabled is None:
            enabled = _enabled_default if _enabled_default is not None else _isatty(self.stream)
        self.enabled = enabled
        self._last = 0.0
        self._render: Callable[[], str] | None = None
        self._text = ""

    def update(self, text: str | Callable[[], str], force: bool = False) -> None:
        """Shows ``text``, or what the callable returns, unless the last redraw was too recent.

        A callable is called only when the line is drawn, so a costly figure
        costs nothing off a terminal; ``finish`` calls it once more, so the
        line left on screen shows the final figures.
        """
        if not self.enabled:
            return
        self._render = text if callable(text) else (lambda: text)
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self._draw(self._render())

    def _draw(self, text: str, end: str = "") -> None:
        width = _columns(self.stream)
        if width > 1 and len(text) >= width:
            text = text[:width - 2] + "…"  # a wrapped line could no longer be cleared in one go
        with _lock:
            self._text = text
            # One write: another process's log line cannot land between the text and its end.
            self.stream.write(CLEAR_LINE + text + end)
            self.stream.flush()
            _drawn.add(self)

    def redraw(self) -> None:
        """Draws the last text again (after a log line took its row)."""
        with _lock:
            if self in _drawn:
                self.stream.write(CLEAR_LINE + self._text)
                self.stream.flush()

    def finish(self) -> None:
        """Leaves the line on screen with its final figures and ends it, so the next line starts clean."""
        with _lock:
            if self not in _drawn:
                return
            self._draw(self._render() if self._render is not None else self._text, end="\n")
            _drawn.discard(self)


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[#####.....]``: ``fraction`` (0..1) of ``width`` cells filled."""
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def placed_line(placed: int, total: int, mbps: float, faults_per_s: float, stall_p50_us: float, races: int) -> str:
    """The destination's live line: how much memory is here, how fast, and what the guest feels.

    Example: ``[##########..........]  52% 136314/262144 pages, 980 MB/s,
    1200 faults/s, stall p50 45 µs, 12 races absorbed``.
    """
    fraction = placed / total if total else 1.0
    return (f"{bar(fraction)} {100 * fraction:3.0f}% {placed}/{total} pages, {mbps:.0f} MB/s, "
            f"{faults_per_s:.0f} faults/s, stall p50 {stall_p50_us:.0f} µs, {races} races absorbed")
