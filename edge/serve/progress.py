"""A small progress reporter for the long steps of ``edge compile`` (export, calibrate, build).

Written to stderr so that ``edge compile``'s stdout stays machine-readable; a bar that
redraws in place on a terminal, one line per step otherwise (logs, CI).
"""
from __future__ import annotations

import sys
import time


class Progress:
    """Steps with an optional count; ``start`` / ``advance`` / ``done``."""

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.name, self.total, self.count, self.t0 = "", None, 0, 0.0

    def start(self, name: str, total: int | None = None) -> None:
        self.name, self.total, self.count, self.t0 = name, total, 0, time.perf_counter()
        self._draw()

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self.tty:
            self._draw()

    def done(self) -> None:
        dt = time.perf_counter() - self.t0
        end = "\r" if self.tty else ""
        self.stream.write(f"{end}{self._line()} done in {dt:.1f}s\n")
        self.stream.flush()

    def _line(self) -> str:
        if not self.total:
            return f"  {self.name} ..."
        frac = min(1.0, self.count / self.total)
        fill = int(frac * self.width)
        return f"  {self.name} [{'#' * fill}{'.' * (self.width - fill)}] {self.count}/{self.total}"

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line())
            self.stream.flush()


class step:
    """Context manager reporting one step to an optional ``Progress`` (None = silent)."""

    def __init__(self, progress: Progress | None, name: str, total: int | None = None):
        self.progress, self.name, self.total = progress, name, total

    def __enter__(self):
        if self.progress is not None:
            self.progress.start(self.name, self.total)
        return self.progress

    def __exit__(self, *exc):
        if self.progress is not None and exc[0] is None:
            self.progress.done()
