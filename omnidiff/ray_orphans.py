"""What a killed Ray driver leaves behind on a long-lived cluster, found and stopped (issue 15 item 9).

    python -m omnidiff.ray_orphans watch --pid 1234 --create-time 1.7e9 --job 05000000 --done FILE

A driver connected to the stack's Ray (``RAY_ADDRESS``) takes its job's actors down with it when it
dies, except *detached* ones: Ray Train's controller starts a detached ``PlacementGroupCleaner`` that
asks the state API whether the controller still lives, and without a dashboard (the stack runs
none) it never learns, logging a warning every second for as long as the cluster runs.

* :func:`stop_orphans`: every live actor of the given dead jobs, and every ``PlacementGroupCleaner``
  of any dead job, is killed (its worker process, on this node). The training driver calls it before
  each launch, so a rerun clears what the killed run left.
* :func:`start_watcher` / ``watch``: a small process in its own session that waits for the driver
  to die or to write its ``done`` file (a clean end of the launch: the watcher just exits); on the
  driver's death it connects and stops the driver's orphans at once, so they do not wait for a
  rerun that may never come.

Actors are looked up in the GCS tables (``ray._private.state``), which need no dashboard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Detached actors whose only purpose dies with their creator's job.
ORPHAN_CLASSES = ("PlacementGroupCleaner",)


def current_job_id() -> str:
    """The Ray job id (hex) of this connected driver."""
    import ray

    return ray.get_runtime_context().get_job_id()


def orphans(job_ids: Iterable[str] = (), classes: Iterable[str] = ORPHAN_CLASSES) -> list[dict[str, Any]]:
    """Live unnamed actors of the jobs ``job_ids`` (whose drivers are known to be gone), and live actors
    of a class in ``classes`` whose job is dead: ``[{actor_id, class, job_id, pid, node_id}]``.

    A *named* detached actor is a cluster-wide service that whichever job came first created and
    every later job shares (Ray Data's ``AutoscalingCoordinator`` and stats actor, Serve's
    controller): it outlives its creator on purpose and is never an orphan.
    """
    from ray._private import state

    job_ids, classes = set(job_ids), set(classes)
    dead_jobs = {j["JobID"] for j in state.jobs() if j.get("IsDead")}
    found = []
    for actor_id, actor in state.actors(actor_state_name="ALIVE").items():
        job = actor["JobID"]
        cls = actor["ActorClassName"].rsplit(".", 1)[-1]
        if actor.get("Name"):
            continue
        if job in job_ids or (cls in classes and job in dead_jobs):
            found.append({"actor_id": actor_id, "class": cls, "job_id": job, "pid": actor.get("Pid"),
                          "node_id": actor["Address"]["NodeID"]})
    return found


def stop_orphans(job_ids: Iterable[str] = (), classes: Iterable[str] = ORPHAN_CLASSES,
                 wait_s: float = 10.0) -> list[dict[str, Any]]:
    """Kill the actors :func:`orphans` finds (their worker processes on this node); returns them.

    An orphan on another node is returned with ``"skipped": "on node <id>"``: its process cannot be
    signalled from here. Waits up to ``wait_s`` for the GCS to see them dead.
    """
    import psutil
    import ray

    here = ray.get_runtime_context().get_node_id()
    found = orphans(job_ids, classes)
    killed = []
    for actor in found:
        if actor["node_id"] != here:
            actor["skipped"] = f"on node {actor['node_id']}"
            continue
        try:
            proc = psutil.Process(actor["pid"])
            if "ray::" not in " ".join(proc.cmdline()) and not proc.name().startswith("ray::"):
                actor["skipped"] = f"pid {actor['pid']} is not a Ray worker"
                continue
            proc.kill()
            killed.append(actor["actor_id"])
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + wait_s
    while killed and time.monotonic() < deadline:
        from ray._private import state

        alive = set(state.actors(actor_state_name="ALIVE"))
        if not alive & set(killed):
            break
        time.sleep(0.2)
    return found


def start_watcher(job_id: str, done_file: Path, log_path: Path) -> dict[str, Any]:
    """Start ``watch`` for this process (the driver of Ray job ``job_id``); returns its supervisor record."""
    import psutil

    from omnidiff import supervisor

    supervisor.reap()  # earlier watchers of this process that have exited (no zombies in a long-lived process)
    argv = [sys.executable, "-m", "omnidiff.ray_orphans", "watch", "--pid", str(os.getpid()),
            "--create-time", repr(psutil.Process().create_time()), "--job", job_id, "--done", str(done_file)]
    proc = supervisor.launch(argv, dict(os.environ), log_path)  # own session: outlives a SIGKILLed driver
    return supervisor.record(proc, log_path)


def watch(pid: int, create_time: float, job_id: str, done_file: Path, poll_s: float = 1.0) -> list[dict[str, Any]]:
    """Wait until process ``pid`` is gone or ``done_file`` appears; stop the job's orphans in the first case.

    Only for a cluster given by ``RAY_ADDRESS``: a private Ray started by the driver dies with it.
    """
    from omnidiff.supervisor import is_alive

    while is_alive(pid, create_time) and not done_file.exists():
        time.sleep(poll_s)
    if done_file.exists():
        done_file.unlink(missing_ok=True)
        return []
    if not os.environ.get("RAY_ADDRESS"):
        return []
    from omnidiff.stack import ensure_ray

    ensure_ray()
    return stop_orphans([job_id])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omnidiff.ray_orphans", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="stop a driver's orphaned actors when it dies")
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--create-time", type=float, required=True)
    w.add_argument("--job", required=True)
    w.add_argument("--done", type=Path, required=True)
    args = parser.parse_args(argv)
    stopped = watch(args.pid, args.create_time, args.job, args.done)
    print(json.dumps({"driver_pid": args.pid, "job": args.job, "stopped": stopped}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
