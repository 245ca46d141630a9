"""Progress lines with rate and ETA for long work (logged, not a terminal bar, so logs stay readable)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("omnidiff")


class Progress:
    """``with Progress("embed", total=n, unit="tok") as p: p.update(k)`` prints a line every ``every_s``.

    Line: ``[embed] 1200/5000 tok (24.0%) 310.2 tok/s, eta 12s``.
    """

    def __init__(self, name: str, total: int | None, unit: str = "it", every_s: float = 5.0, stream=None):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self._last = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.emit(final=True)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.emit()

    def emit(self, final: bool = False) -> None:
        rate = self.rate
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = "done" if final else (f"eta {eta:.0f}s" if eta != float("inf") else "eta ?")
            line = f"[{self.name}] {self.done}/{self.total} {self.unit} ({pct:.1f}%) {rate:.1f} {self.unit}/s, {eta_s}"
        else:
            line = f"[{self.name}] {self.done} {self.unit} {rate:.1f} {self.unit}/s"
        print(line, file=self.stream, flush=True)
