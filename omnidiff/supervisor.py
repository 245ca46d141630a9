"""One way to start, track, check and stop a background process, and to wait for a condition.

Used for the local stack's servers (omnidiff/stack.py), the Prefect deployment-serving process
(flows/cli.py), and the polling of Serve and Prefect state.

    proc = launch(argv, env, log_path)            # own session = own process group; log appended
    rec = record(proc, log_path)                  # {"pid", "pgid", "create_time", "log", "argv"}
    is_alive(rec["pid"], rec["create_time"])      # a recycled pid is never taken for ours
    stop_all([rec], grace_s=15)                   # SIGTERM, grace, SIGTERM the rest, SIGKILL
    wait_until(lambda: ready() or None, timeout_s=60)

A record is plain JSON: it is written to a state file (``write_json``) right after the launch,
so another process (``omnidiff stack down``) can stop what this one started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from omnidiff.contracts.io import atomic_write

T = TypeVar("T")

# Popen objects of processes this process started, so that a stop in the same process can reap
# them (a dead child stays a zombie, and so "alive", until it is waited for).
_CHILDREN: dict[int, subprocess.Popen] = {}


# ----------------------------------------------------------------------------- records on disk


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a reader never sees half."""
    atomic_write(path, json.dumps(data, indent=2, default=str))


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ----------------------------------------------------------------------------- launch


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, 15)  # PR_SET_PDEATHSIG = 1, SIGTERM = 15


def launch(argv: list[str], env: dict[str, str], log_path: Path, fate_share: bool = False) -> subprocess.Popen:
    """Start ``argv`` in its own session with stdout + stderr appended to ``log_path``.

    Its own session is its own process group: a stop signals the whole group, and Ctrl-C in the
    shell that started it does not reach it. ``fate_share=True`` makes it get SIGTERM when this
    process dies (Linux), so a killed test session leaves nothing behind.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} omnidiff stack: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if fate_share and sys.platform.startswith("linux") else None,
        )
    _CHILDREN[proc.pid] = proc
    return proc


def record(proc: subprocess.Popen, log_path: Path, **extra: Any) -> dict[str, Any]:
    """What identifies a launched process for a later check or stop (JSON-able)."""
    return {"pid": proc.pid, "pgid": os.getpgid(proc.pid), "create_time": psutil.Process(proc.pid).create_time(),
            "log": str(log_path), **extra}


def exit_code(pid: int) -> int | None:
    """The exit code of a child this process launched, once it has exited; None while it runs (or unknown)."""
    proc = _CHILDREN.get(pid)
    return None if proc is None else proc.poll()


def log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (log is empty)"


# ----------------------------------------------------------------------------- liveness


def is_alive(pid: int | None, create_time: float | None = None) -> bool:
    """True if ``pid`` runs, is no zombie, and (given ``create_time``) is the process recorded then."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A recycled pid belongs to a process created later than ours.
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.NoSuchProcess:
        return False


def _still_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def processes_of(records: list[dict[str, Any]]) -> list[psutil.Process]:
    """Every live process of the records: each recorded process tree, and every member of a recorded
    process group created after the first record (an older process cannot be ours, whatever its group)."""
    found: dict[int, psutil.Process] = {}
    for rec in records:
        if is_alive(rec["pid"], rec.get("create_time")):
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(rec["pid"])
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
    pgids = {rec.get("pgid", rec["pid"]) for rec in records}
    started_at = min((rec.get("create_time") or 0.0 for rec in records), default=0.0) - 1.0
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) in pgids and proc.info["create_time"] >= started_at:
                found[proc.pid] = proc
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return [p for p in found.values() if p.pid != os.getpid()]


# ----------------------------------------------------------------------------- stop


def stop_all(records: list[dict[str, Any]], grace_s: float = 15.0, leaders_first: bool = True) -> dict[str, list[int]]:
    """Stop the recorded processes and everything they started; ``{"stopped": pids, "killed": pids}``.

    1. SIGTERM to each recorded process (``leaders_first``; else at once to every member of its
       group), waiting up to ``grace_s``: a server then stops its children in its own order.
    2. SIGTERM to whatever is left of the recorded groups and trees, 3. SIGKILL after 5 s (or ``grace_s``, if
       shorter: a caller that gives the servers less time gives their leftovers no more).
    ``killed_names``: the SIGKILLed processes' pids and command lines. Raises RuntimeError naming the pids that
    survive SIGKILL.
    """
    procs = processes_of(records)
    first = []
    for rec in records:
        if not is_alive(rec["pid"], rec.get("create_time")):
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            leader = psutil.Process(rec["pid"])
            if leaders_first:
                leader.terminate()
                first.append(leader)
            else:
                group = [p for p in procs if _pgid(p) == rec.get("pgid", rec["pid"])]
                for proc in group:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.terminate()
                first += group
    psutil.wait_procs(first, timeout=grace_s, callback=lambda p: reap())
    # Re-scan: a process stopped mid start-up may have started children after the first look.
    seen = {p.pid: p for p in [*procs, *processes_of(records)]}
    procs = list(seen.values())
    left = [p for p in procs if _still_running(p)]
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=min(5.0, grace_s), callback=lambda p: reap())
    described = [_describe(proc) for proc in alive]  # what ignored SIGTERM (named before it is gone)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, survivors = psutil.wait_procs(alive, timeout=5.0)
    reap()
    if survivors:
        raise RuntimeError(f"processes survived SIGKILL: {[p.pid for p in survivors]}")
    return {"stopped": sorted(p.pid for p in procs), "killed": sorted(p.pid for p in alive), "left": len(left),
            "killed_names": sorted(described)}


def _describe(proc: psutil.Process) -> str:
    """``<pid> <the first words of its command line>``: enough to tell which server a process belongs to."""
    try:
        words = proc.cmdline() or [proc.name()]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"{proc.pid} (gone)"
    return f"{proc.pid} {' '.join(Path(words[0]).name if i == 0 else w for i, w in enumerate(words[:4]))}"[:160]


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None


def signal_group(pgid: int, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ----------------------------------------------------------------------------- waiting


def wait_until(check: Callable[[], T | None], timeout_s: float, interval_s: float = 0.5) -> T | None:
    """Call ``check`` every ``interval_s`` until it returns something truthy, for at most ``timeout_s``.

    Returns that value, or the last (falsy) one when the time is up; an exception from ``check``
    ends the wait at once (raise to report a failure that waiting will not cure).
    """
    retrying = Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(interval_s),
                        retry=retry_if_result(lambda value: not value),
                        retry_error_callback=lambda state: state.outcome.result(), reraise=True)
    try:
        return retrying(check)
    except RetryError:  # pragma: no cover (retry_error_callback returns instead)
        return None
