"""A dependency-free progress line for terminals and logs.

On a TTY the line is redrawn in place with ``\\r``::

    strata 120/200 done, 1 failed, 35.2/s, ETA 2s

When the stream is not a TTY (CI logs, ``kubectl logs``) plain lines are written, at
most one every ``log_every`` seconds plus the last one.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from service.runstate import Progress, format_eta

__all__ = ["ProgressPrinter", "format_progress"]


def format_progress(done: int, failed: int, total: int, rate: float) -> str:
    """``"strata 120/200 done, 1 failed, 35.2/s, ETA 2s"``.

    Parameters
    ----------
    done, failed, total : int
        Strata with any outcome, of which failed, in the job.
    rate : float
        Strata per second.

    Returns
    -------
    str
    """
    eta = Progress(done, failed, total, rate).eta
    return f"strata {done}/{total} done, {failed} failed, {rate:.1f}/s, {format_eta(eta)}"


class ProgressPrinter:
    """Callable progress sink ``(done, failed, total, rate)`` for :class:`~service.runner.Runner`.

    Parameters
    ----------
    stream : file, default sys.stderr
        Where to write.
    tty : bool, optional
        Redraw in place; default ``stream.isatty()``.
    log_every : float, default 5
        Minimum seconds between plain lines when not a TTY.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, log_every: float = 5.0):
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.log_every = float(log_every)
        self._last_write = float("-inf")
        self._last_line = ""
        self._width = 0
        self._open = False
        self._final_written = False

    def __call__(self, done: int, failed: int, total: int, rate: float) -> None:
        line = format_progress(done, failed, total, rate)
        if line == self._last_line:
            return
        self._last_line = line
        now = time.monotonic()
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
            self._open = True
        else:
            final = done >= total
            if final and self._final_written:
                return
            if not final and now - self._last_write < self.log_every:
                return
            self.stream.write(line + "\n")
            self._last_write = now
            self._final_written = final
        self.stream.flush()

    def close(self) -> None:
        """End the redrawn line (call once the job is over)."""
        if self.tty and self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
