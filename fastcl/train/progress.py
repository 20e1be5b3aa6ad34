"""The progress bar of a training run."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class ProgressBar:
    """A minimal progress bar on ``stream`` (stderr): redrawn in place on a terminal, a line every
    ``line_interval`` seconds (and at the end) otherwise. Shows steps, loss, samples/s and the ETA."""

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 line_interval: float = 15.0, width: int = 24) -> None:
        self.total = max(int(total), 0)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.total > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.line_interval = line_interval
        self.width = width
        self.n = 0
        self.samples = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_line = self.start

    def update(self, samples: int, desc: str = "", **postfix: float) -> None:
        self.n += 1
        self.samples += samples
        if not self.enabled:
            return
        now = time.perf_counter()
        done = self.n >= self.total
        if self.tty and not done and now - self._last_draw < 0.1:
            return
        if not self.tty and not done and now - self._last_line < self.line_interval:
            return
        elapsed = now - self.start
        rate = self.samples / elapsed if elapsed > 0 else float("nan")
        eta = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
        fill = int(self.width * self.n / self.total)
        extras = " ".join(f"{k} {v:.4f}" for k, v in postfix.items())
        text = (f"{desc} [{'#' * fill}{'.' * (self.width - fill)}] {self.n}/{self.total} {extras} | "
                f"{rate:.0f} samples/s | ETA {_fmt_time(eta)}")
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if done else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_draw = self._last_line = now
