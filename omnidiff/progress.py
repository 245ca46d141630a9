"""Progress lines with rate and ETA for long work, and the events a watcher shows on a console.

A :class:`Progress` prints its line to stderr (logged, not a terminal bar, so logs stay readable)
and also appends it, as a JSON event, to ``$OMNIDIFF_HOME/progress/events.jsonl``; the pipeline
appends an event when each stage starts and ends (:func:`emit_event`). The stages run in other
processes than the one that triggered them (the deployment-serving process, Ray Train workers,
Ray Data actors), all with the same ``OMNIDIFF_HOME``: the file is how ``omnidiff demo`` shows
them as they happen. :class:`ConsoleReporter` turns events into one console line each, and
during a stage at least one line with rate and ETA every ``heartbeat_s`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("omnidiff")

EVENTS_FILE = "events.jsonl"


# ----------------------------------------------------------------------------- events


def events_path() -> Path:
    from omnidiff.env import subdir

    return subdir("progress") / EVENTS_FILE


def emit_event(kind: str, **fields: Any) -> None:
    """Append one event (``{"t", "pid", "kind", ...}``) to the events file; never raises.

    One ``write`` of one line on a file opened with O_APPEND: lines from several processes never
    interleave. Reporting progress must never take the work down, so an error is only logged.
    """
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "kind": kind, **fields}, default=str) + "\n"
    try:
        fd = os.open(events_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.debug("progress event not written: %s", exc)


def read_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete event lines after byte ``offset``, and the offset after the last of them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    events = []
    for raw in data[:end].splitlines():
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return events, offset + end


def end_offset(path: Path) -> int:
    """Where a watcher starts reading: what is in the file now happened before it started."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ----------------------------------------------------------------------------- Progress


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_progress(name: str, done: int, total: int | None, unit: str, rate: float, eta_s: float | None,
                    final: bool = False) -> str:
    """``[embed] 1200/5000 tok (24.0%) 310.2 tok/s, eta 12s``."""
    if total:
        pct = 100.0 * done / total
        eta = "done" if final else (f"eta {eta_s:.0f}s" if eta_s is not None else "eta ?")
        return f"[{name}] {done}/{total} {unit} ({pct:.1f}%) {rate:.1f} {unit}/s, {eta}"
    return f"[{name}] {done} {unit} {rate:.1f} {unit}/s"


class Progress:
    """``with Progress("embed", total=n, unit="tok") as p: p.update(k)`` prints a line every ``every_s``.

    Line: ``[embed] 1200/5000 tok (24.0%) 310.2 tok/s, eta 12s``. Each line is also an event
    (at most one every ``EVENT_EVERY_S`` seconds, and the last one always).
    """

    EVENT_EVERY_S = 2.0

    def __init__(self, name: str, total: int | None, unit: str = "it", every_s: float = 5.0, stream=None):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self._last = time.perf_counter()
        self._last_event = float("-inf")

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
        eta_s = (self.total - self.done) / rate if self.total and rate > 0 else None
        print(format_progress(self.name, self.done, self.total, self.unit, rate, eta_s, final),
              file=self.stream, flush=True)
        now = time.perf_counter()
        if final or now - self._last_event >= self.EVENT_EVERY_S:
            self._last_event = now
            emit_event("progress", name=self.name, done=self.done, total=self.total, unit=self.unit,
                       rate=rate, eta_s=eta_s, final=final)


# ----------------------------------------------------------------------------- console


class ConsoleReporter:
    """Events in, console lines out: one line per stage start and end, progress at a steady pace.

    ``handle(event)`` for each event read, ``tick()`` between reads. A stage's progress lines are
    printed at most every ``progress_every_s`` (the first and the last always); while a stage runs,
    ``tick`` makes sure some line with the latest rate and ETA appears at least every
    ``heartbeat_s``. Stage events of another pipeline run (``run`` differs) are ignored.
    """

    def __init__(self, write: Callable[[str], None] = print, run: str | None = None,
                 progress_every_s: float = 20.0, heartbeat_s: float = 30.0, clock: Callable[[], float] = time.time):
        self.write, self.run, self.clock = write, run, clock
        self.progress_every_s, self.heartbeat_s = progress_every_s, heartbeat_s
        self.stage: str | None = None
        self.stage_t0 = 0.0
        self.last_line = clock()
        self.last_progress: dict[str, Any] | None = None
        self._printed_at: dict[str, float] = {}

    def _say(self, text: str, at: float | None = None) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(at if at is not None else self.clock()))
        self.write(f"{stamp}  {text}")
        self.last_line = self.clock()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind in ("stage_start", "stage_end") and self.run and event.get("run") not in (None, self.run):
            return
        if kind == "stage_start":
            self.stage, self.stage_t0, self.last_progress = event["stage"], event["t"], None
            self._say(f"{event['stage']:<13} started", event["t"])
        elif kind == "stage_end":
            how = (f"skipped: inputs unchanged (digest {event.get('digest')})" if event.get("skipped")
                   else "ran")
            self._say(f"{event['stage']:<13} done in {_duration(event.get('seconds', 0))}, {how}", event["t"])
            self.stage, self.last_progress = None, None
        elif kind == "progress":
            self.last_progress = event
            name, now = event["name"], self.clock()
            first = name not in self._printed_at
            if first or event.get("final") or now - self._printed_at[name] >= self.progress_every_s:
                self._printed_at[name] = now
                self._say(f"{self.stage or '':<13} " + format_progress(
                    name, event["done"], event.get("total"), event.get("unit", "it"), event.get("rate", 0.0),
                    event.get("eta_s"), bool(event.get("final"))))

    def tick(self) -> None:
        """A heartbeat line when nothing was printed for ``heartbeat_s`` while a stage runs."""
        now = self.clock()
        if self.stage is None or now - self.last_line < self.heartbeat_s:
            return
        text = f"{self.stage:<13} running for {_duration(now - self.stage_t0)}"
        p = self.last_progress
        if p is not None:
            age = now - p["t"]
            eta = p.get("eta_s")
            eta = None if eta is None or p.get("final") else max(0.0, eta - age)
            text += "; " + format_progress(p["name"], p["done"], p.get("total"), p.get("unit", "it"),
                                           p.get("rate", 0.0), eta, bool(p.get("final")))
            text += f" (as of {_duration(age)} ago)"
        else:
            text += " (this step reports no rate)"
        self._say(text)
