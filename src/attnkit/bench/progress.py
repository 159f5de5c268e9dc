"""A dependency-free progress bar for long sweeps: current case, done/total, time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """``[#####.....] 12/60 ETA 3m12s  sigmoid/blocked causal_self fwd T=4096``.

    Redraws one line on a terminal; on a pipe or file prints a line per case. The estimate of the
    time left is the mean time of the cases actually measured so far times the cases left.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, width: int = 24, enabled: bool = True):
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = enabled
        self.done = 0
        self.measured = 0
        self.measured_s = 0.0
        self.started = time.perf_counter()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def eta_s(self) -> float | None:
        if not self.measured:
            return None
        return self.measured_s / self.measured * (self.total - self.done)

    def line(self, what: str) -> str:
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        eta = self.eta_s()
        eta_text = f"ETA {_clock(eta)}" if eta is not None else "ETA --"
        return f"[{bar}] {self.done}/{self.total} {eta_text}  {what}"

    def start(self, what: str) -> None:
        if not self.enabled:
            return
        text = self.line(what)
        if self._tty:
            self.stream.write("\r\033[K" + text[:160])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish_case(self, seconds: float | None) -> None:
        """One case is over; ``seconds`` is its cost when it was measured (None: skipped)."""
        self.done += 1
        if seconds is not None:
            self.measured += 1
            self.measured_s += seconds

    def close(self, summary: str) -> None:
        if not self.enabled:
            return
        if self._tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"{summary} in {_clock(time.perf_counter() - self.started)}\n")
        self.stream.flush()
