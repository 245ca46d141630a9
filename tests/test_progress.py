"""Progress lines, the events file, and the console a person watches during `omnidiff demo`.

    .venv/bin/pytest tests/test_progress.py -q
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

from omnidiff import progress
from omnidiff.progress import ConsoleReporter, Progress, end_offset, events_path, read_events


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_progress_line_format_is_unchanged(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path))
    out = io.StringIO()
    with Progress("embed", total=10, unit="tok", every_s=1e9, stream=out) as p:
        p.update(4)
    line = out.getvalue().strip()
    assert line.startswith("[embed] 4/10 tok (40.0%) ") and line.endswith("tok/s, done")
    out = io.StringIO()
    Progress("world", total=None, unit="img", stream=out).emit()
    assert out.getvalue().startswith("[world] 0 img 0.0 img/s")


def test_progress_lines_become_events_that_a_watcher_reads(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path))
    start = end_offset(events_path())
    with Progress("train stage1", total=100, unit="step", every_s=0, stream=io.StringIO()) as p:
        for _ in range(5):
            p.update(20)
    events, offset = read_events(events_path(), start)
    assert offset == events_path().stat().st_size
    assert events[0]["kind"] == "progress" and events[0]["name"] == "train stage1"
    assert events[-1]["final"] is True and events[-1]["done"] == 100
    assert len(events) <= 3  # at most one event every EVENT_EVERY_S, plus the last one
    assert read_events(events_path(), offset) == ([], offset)


def test_events_from_several_processes_never_interleave(tmp_path):
    code = ("from omnidiff.progress import emit_event\n"
            "for i in range(300): emit_event('progress', name='p', done=i, pad='x' * 300)\n")
    env = {**__import__("os").environ, "OMNIDIFF_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = (tmp_path / "progress" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 900
    assert all(json.loads(line)["kind"] == "progress" for line in lines)


def test_a_partly_written_line_waits_for_the_next_read(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"kind": "stage_start", "stage": "a", "t": 1}) + "\n" + '{"kind": "stag')
    events, offset = read_events(path, 0)
    assert [e["stage"] for e in events] == ["a"]
    with open(path, "a") as f:
        f.write('e_end", "stage": "a", "t": 2}\n')
    events, _ = read_events(path, offset)
    assert [e["kind"] for e in events] == ["stage_end"]


def test_console_shows_each_stage_and_a_rate_and_eta_at_least_every_30s():
    """A fake event source: a pipeline with one skipped stage and one long stage."""
    clock, lines = FakeClock(), []
    reporter = ConsoleReporter(write=lines.append, run="run-1", clock=clock)
    t0 = clock.t
    script = [  # (seconds after t0, event or None for a tick)
        (0, {"kind": "stage_start", "stage": "collect", "run": "run-1"}),
        (1, {"kind": "stage_end", "stage": "collect", "run": "run-1", "seconds": 0.4, "skipped": True,
             "digest": "abc123"}),
        (1, {"kind": "stage_start", "stage": "stage1", "run": "run-1"}),
        (2, {"kind": "stage_start", "stage": "embed", "run": "another-run"}),  # someone else's pipeline
        (5, {"kind": "progress", "name": "train stage1", "done": 10, "total": 1200, "unit": "step",
             "rate": 2.0, "eta_s": 595.0, "final": False}),
    ]
    # then a progress event every 5 s for 60 s, and a silent stretch of 100 s (a slow update)
    for k in range(1, 13):
        script.append((5 + 5 * k, {"kind": "progress", "name": "train stage1", "done": 10 + 10 * k, "total": 1200,
                                   "unit": "step", "rate": 2.0, "eta_s": 595.0 - 5 * k, "final": False}))
    script += [(s, None) for s in range(66, 166, 2)]
    script += [(170, {"kind": "progress", "name": "train stage1", "done": 1200, "total": 1200, "unit": "step",
                      "rate": 7.0, "eta_s": 0.0, "final": True}),
               (171, {"kind": "stage_end", "stage": "stage1", "run": "run-1", "seconds": 170.0, "skipped": False})]
    printed_at = []
    for at, event in script:
        clock.t = t0 + at
        before = len(lines)
        if event is None:
            reporter.tick()
        else:
            reporter.handle({"t": clock.t, **event})
        printed_at += [at] * (len(lines) - before)

    text = "\n".join(lines)
    assert "collect       started" in text
    assert "collect       done in 0s, skipped: inputs unchanged (digest abc123)" in text
    assert "stage1        done in 2m50s, ran" in text
    assert "embed" not in text  # another run's stage is not ours
    # One line per stage event; progress thinned out, never more than ~one every 20 s.
    progress_lines = [line for line in lines if "[train stage1]" in line]
    assert 5 <= len(progress_lines) <= 12, lines
    # While stage1 runs (t=1..171), no gap between lines is longer than 30 s (+ one tick of 2 s).
    inside = [at for at in printed_at if 1 <= at <= 171]
    assert max(b - a for a, b in zip(inside, inside[1:], strict=False)) <= 32, printed_at
    heartbeats = [line for line in lines if "running for" in line]
    assert heartbeats and all("step/s, eta " in line and "as of" in line for line in heartbeats)
    # The heartbeat's ETA counts down from the last event's (555 s at t=65): not stale.
    first = heartbeats[0]
    assert "eta 5" in first and "eta 555s" not in first


def test_heartbeat_without_progress_says_so():
    clock, lines = FakeClock(), []
    reporter = ConsoleReporter(write=lines.append, clock=clock)
    reporter.handle({"kind": "stage_start", "stage": "collect", "t": clock.t})
    clock.t += 31
    reporter.tick()
    assert lines[-1].endswith("collect       running for 31s (this step reports no rate)")
    clock.t += 5
    reporter.tick()  # nothing new 5 s after a line
    assert len(lines) == 2


def test_emit_event_never_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(progress, "events_path", lambda: tmp_path / "missing-dir" / "events.jsonl")
    progress.emit_event("progress", name="x")  # logged, not raised
