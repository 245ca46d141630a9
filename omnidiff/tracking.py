"""MLflow helpers every stage uses: one run per stage, the resolved config logged, the model registry.

    from omnidiff import tracking

    with tracking.start_run("train", config=cfg) as run:        # experiment "omnidiff"
        mlflow.log_metric("loss", 0.1, step=1)
        tracking.log_figure(fig, "samples/step_100.png")
        version = tracking.register_model(export_dir, "omnidiff-tiny", alias="candidate", tags={"stage": "2"})
    folder = tracking.resolve_model("omnidiff-tiny@candidate")  # -> local pipeline folder

Where runs go: ``MLFLOW_TRACKING_URI`` (the local stack sets it: ``omnidiff
stack up``, then :func:`omnidiff.stack.apply_env`), else a SQLite store under
``$OMNIDIFF_HOME/mlflow`` so that a stage also runs without the stack (never
``./mlruns``).

Registry: :func:`register_model` logs the export folder as artifacts of the
run (``exports/<name>/``) and creates a model version whose source is that
artifact folder and whose ``run_id`` is the run. A version registered the
MLflow 3 way (a LoggedModel, source ``models:/m-<id>``, ../shared/NOTES.md)
resolves just the same: :func:`resolve_model` downloads through the
``models:/<name>/<version>`` URI, which follows either kind of source.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omnidiff import config as config_lib
from omnidiff.env import subdir

EXPERIMENT = "omnidiff"
# mlflow's tqdm bars would interleave with our progress lines.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_REF_VERSION = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)/(?P<version>\d+)$")
_REF_ALIAS = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)@(?P<alias>[A-Za-z0-9_\-]+)$")


class TrackingError(RuntimeError):
    """A tracking call was used wrongly (no active run, bad model reference); the message says how."""


# ----------------------------------------------------------------------------- where runs go


def tracking_uri() -> str:
    """The tracking URI this process uses; picks the running stack or a local SQLite store (sets the env var)."""
    from omnidiff import stack

    stack.apply_env()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{subdir('mlflow') / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri  # subprocesses (Ray workers, torchrun) log to the same store
    return uri


def _client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(name: str = EXPERIMENT) -> str:
    """Id of experiment ``name``, created on first use (artifacts under home for a local store)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if not tracking_uri().startswith(("http://", "https://", "databricks")):
        location = (subdir("mlflow", "artifacts")).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the project's git checkout, ``+dirty`` when tracked files changed; ``unknown`` outside git."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def prefect_flow_run_id() -> str | None:
    """The id of the Prefect flow run this code runs in, or None.

    Prefect is imported only if it already is: outside a flow nothing pays for it.
    A subprocess of a flow run sees the id through Prefect's own env variable.
    """
    if "prefect" in sys.modules:
        with contextlib.suppress(Exception):
            from prefect.runtime import flow_run

            if flow_run.id:
                return str(flow_run.id)
    return os.environ.get("PREFECT__FLOW_RUN_ID") or None


def _param_value(value: Any) -> str:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."


# ----------------------------------------------------------------------------- runs


PARENT_RUN_ENV = "OMNIDIFF_PARENT_RUN_ID"


@contextlib.contextmanager
def start_run(
    stage: str,
    config: Any = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    parent_of_any_thread: bool = False,
) -> Iterator[Any]:
    """An MLflow run in experiment ``omnidiff`` for one stage; yields ``mlflow.ActiveRun``.

    Tags: ``stage``, ``git.commit``, ``prefect.flow_run_id`` (inside a flow
    run) and ``tags``. ``config`` (a stage config dataclass) is logged as flat
    params (``download.processes``) and as the artifact ``config.yaml``.
    Nested: under ``parent_run_id``, or under this process's active run. The
    run ends FINISHED, or FAILED when the block raises. ``parent_of_any_thread``: runs started
    while this one is open nest under it even from other threads (MLflow's active run is
    per-thread; Prefect runs tasks in worker threads); undone when the block ends, however it ends.
    """
    import mlflow

    exp_id = experiment_id()
    active = mlflow.active_run()
    if parent_run_id is None and active is not None:
        parent_run_id = active.info.run_id
    if parent_run_id is None:  # an open ``parent_of_any_thread`` run (the pipeline's)
        parent_run_id = os.environ.get(PARENT_RUN_ENV) or None
    all_tags = {"stage": stage, "git.commit": git_commit()}
    flow_run = prefect_flow_run_id()
    if flow_run:
        all_tags["prefect.flow_run_id"] = flow_run
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=run_name or stage,
        nested=parent_run_id is not None,
        parent_run_id=parent_run_id,
        tags=all_tags,
    ) as run:
        if config is not None:
            resolved = config_lib.to_dict(config)
            mlflow.log_params({k: _param_value(v) for k, v in config_lib.flatten(resolved).items()})
            mlflow.log_text(config_lib.dump_yaml(config), "config.yaml")
        if not parent_of_any_thread:
            yield run
            return
        saved = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if saved is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = saved


def _run_id(run_id: str | None, what: str) -> str:
    import mlflow

    if run_id:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise TrackingError(f"{what}: no active MLflow run; call it inside `with tracking.start_run(...)` or pass run_id")
    return active.info.run_id


def log_figure(fig: Any, artifact_path: str, run_id: str | None = None) -> None:
    """Log a matplotlib figure as an image artifact (``artifact_path`` ends in .png/.svg/...)."""
    _client().log_figure(_run_id(run_id, "log_figure"), fig, artifact_path)


def log_json(obj: Any, artifact_path: str, run_id: str | None = None) -> None:
    """Log ``obj`` as a pretty JSON artifact (non-JSON values such as Paths become strings)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    _client().log_text(_run_id(run_id, "log_json"), text, artifact_path)


# ----------------------------------------------------------------------------- runs that take over a folder

RUN_RECORD = ".mlflow_run.json"


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    """Set ``tags`` (values as strings) on run ``run_id``, open or not (no active-run state)."""
    from mlflow.entities import RunTag

    _client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _read_record(folder: str | Path, settings: Any = None) -> dict[str, Any] | None:
    """``folder``'s run record (local or ``s3://``), or None when there is none or it does not parse."""
    from omnidiff.contracts.storage import StorageError, is_remote, open_folder

    with contextlib.suppress(ValueError, OSError, StorageError):
        if is_remote(folder):
            return json.loads(open_folder(folder, settings).read_bytes(RUN_RECORD))
        path = Path(folder) / RUN_RECORD
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _write_record(folder: str | Path, record: dict[str, Any], settings: Any = None) -> None:
    from omnidiff.contracts.io import atomic_write
    from omnidiff.contracts.storage import is_remote, open_folder

    data = json.dumps(record, indent=1, default=str)
    if is_remote(folder):
        open_folder(folder, settings).write_bytes(RUN_RECORD, data.encode())  # one PUT
    else:
        atomic_write(Path(folder) / RUN_RECORD, data)


def claim_folder(folder: str | Path, run_id: str, settings: Any = None, **extra: Any) -> dict[str, Any] | None:
    """Name run ``run_id`` (and this process) as the one writing ``folder`` now; returns the record it replaces.

    ``folder/.mlflow_run.json`` = ``{run_id, pid, create_time, host, claimed_at, **extra}``. A run that
    resumes or continues a folder (a training's checkpoints, an embedding cache) reads who wrote it
    before, to close that run if it was killed (:func:`close_superseded`). Call it only while holding
    the folder (its lock), so two live runs never claim the same folder. ``folder`` may be an ``s3://``
    prefix (``settings``: its :class:`~omnidiff.contracts.storage.S3Settings`; the record is one PUT).
    """
    previous = _read_record(folder, settings)
    _write_record(folder, _new_record(run_id, **extra), settings)
    return previous


def update_claim(folder: str | Path, run_id: str, settings: Any = None, **extra: Any) -> None:
    """Add ``extra`` to ``folder``'s run record if ``run_id`` still holds it (e.g. the Ray job id, once known)."""
    record = _read_record(folder, settings)
    from omnidiff.contracts.storage import StorageError

    if record is not None and record.get("run_id") == run_id:
        with contextlib.suppress(OSError, StorageError):
            _write_record(folder, {**record, **extra}, settings)


def record_alive(record: dict[str, Any]) -> bool:
    """Whether the process that claimed a folder (:func:`claim_folder`) still runs, other than this one.

    A record of another host counts as alive: its process cannot be checked from here.
    """
    import socket

    from omnidiff.supervisor import is_alive

    if record.get("host") and record["host"] != socket.gethostname():
        return True
    if record.get("pid") == os.getpid():
        return False  # an earlier run of this very process: it has ended, whatever MLflow says
    return is_alive(record.get("pid"), record.get("create_time"))


def close_superseded(previous: dict[str, Any] | None, run_id: str, adopted: str) -> dict[str, Any] | None:
    """Close the run that wrote a folder before run ``run_id`` took it over, and link the two both ways.

    ``previous``: what :func:`claim_folder` returned. A previous run still RUNNING in MLflow whose
    process is gone was killed (SIGKILL, OOM, a lost node): it is marked KILLED. Every unfinished
    previous run (killed, failed) gets the tag ``superseded_by`` = ``run_id``, and run ``run_id`` gets
    ``supersedes`` = its id and ``adopted`` = ``adopted`` (what it took over, e.g. "resumed from step
    6 of run X"). A FINISHED previous run is left as it is. Returns ``{run_id, status, was}`` of the
    previous run, or None when there is nothing to close (no record, our own run, a live process).
    """
    from mlflow.exceptions import MlflowException

    if not previous or not previous.get("run_id") or previous["run_id"] == run_id:
        return None
    old_id = previous["run_id"]
    client = _client()
    try:
        old = client.get_run(old_id)
    except MlflowException:  # a run of another tracking store, or deleted: nothing to close here
        return None
    was = old.info.status
    if was == "FINISHED":
        return None
    if was == "RUNNING":
        if record_alive(previous):
            return None
        client.set_terminated(old_id, status="KILLED")
    set_tags(old_id, {"superseded_by": run_id})
    set_tags(run_id, {"supersedes": old_id, "adopted": adopted})
    return {"run_id": old_id, "status": client.get_run(old_id).info.status, "was": was}


# ----------------------------------------------------------------------------- runs that own no folder


def _live_dir(kind: str) -> Path:
    from omnidiff.env import subdir

    return subdir("runs") / kind


def enter_live(kind: str, run_id: str) -> Path:
    """Record that this process holds run ``run_id`` of ``kind`` (e.g. the pipeline's parent run) until
    :func:`leave_live`; a later run of that kind closes it if this process dies first (:func:`close_dead`).
    For runs that own no folder to :func:`claim_folder`; one record file per run, so runs of the same
    kind may overlap."""
    folder = _live_dir(kind)
    folder.mkdir(parents=True, exist_ok=True)
    return claim_folder_record(folder / f"{run_id}.json", run_id)


def leave_live(kind: str, run_id: str) -> None:
    (_live_dir(kind) / f"{run_id}.json").unlink(missing_ok=True)


def close_dead(kind: str, run_id: str, adopted: str) -> list[dict[str, Any]]:
    """Close the runs of ``kind`` whose process died without ending them (marked KILLED, linked both ways
    with run ``run_id`` as by :func:`close_superseded`); returns what was closed. Records of live
    processes are left; records of finished or closed runs are removed."""
    closed = []
    folder = _live_dir(kind)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (ValueError, OSError):
            path.unlink(missing_ok=True)
            continue
        if record.get("run_id") == run_id or record_alive(record):
            continue
        done = close_superseded(record, run_id, adopted)
        if done is not None:
            closed.append(done)
        path.unlink(missing_ok=True)
    return closed


def _new_record(run_id: str, **extra: Any) -> dict[str, Any]:
    """A run record: ``{run_id, pid, create_time, host, claimed_at, **extra}`` of this process."""
    import socket
    import time

    import psutil

    return {"run_id": run_id, "pid": os.getpid(), "create_time": psutil.Process().create_time(),
            "host": socket.gethostname(), "claimed_at": time.time(), **extra}


def claim_folder_record(path: Path, run_id: str, **extra: Any) -> Path:
    """Write the run record of :func:`claim_folder` for run ``run_id`` at the local ``path``."""
    from omnidiff.contracts.io import atomic_write

    atomic_write(path, json.dumps(_new_record(run_id, **extra), indent=1, default=str))
    return path


# ----------------------------------------------------------------------------- registry


def register_model(
    export_dir: str | Path,
    name: str,
    alias: str | None = None,
    tags: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> str:
    """Register the pipeline folder ``export_dir`` as a new version of ``name``; returns the version.

    The folder is logged as artifacts of the active run (or ``run_id``) under
    ``exports/<name>/``; the version points at them, carries ``tags`` plus
    ``run_id``, and gets ``alias`` (moved from an older version if it had it).
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir() or not any(export_dir.iterdir()):
        raise TrackingError(f"export_dir={str(export_dir)!r}: not a non-empty folder")
    run_id = _run_id(run_id, "register_model")
    client = _client()
    artifact_path = f"exports/{name}"
    client.log_artifacts(run_id, str(export_dir), artifact_path=artifact_path)
    run = client.get_run(run_id)
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # already registered: fine
        client.create_registered_model(name)
    version_tags = {"run_id": run_id, **{k: str(v) for k, v in (tags or {}).items()}}
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id, tags=version_tags
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def is_model_ref(ref: str) -> bool:
    """Whether ``ref`` is written as a registry reference: ``name@alias`` or ``name/version`` (``models:/`` allowed)."""
    return bool(_REF_ALIAS.match(ref) or _REF_VERSION.match(ref))


def model_version(ref: str):
    """The MLflow ``ModelVersion`` for ``name@alias`` or ``name/version`` (``models:/`` prefix allowed)."""
    client = _client()
    from mlflow.exceptions import MlflowException

    by_alias, by_version = _REF_ALIAS.match(ref), _REF_VERSION.match(ref)
    try:
        if by_alias:
            return client.get_model_version_by_alias(by_alias["name"], by_alias["alias"])
        if by_version:
            return client.get_model_version(by_version["name"], by_version["version"])
    except MlflowException as exc:
        raise TrackingError(f"model ref {ref!r}: not in the registry at {tracking_uri()} ({exc.message})") from None
    raise TrackingError(f"model ref {ref!r}: expected an existing folder, 'name@alias' or 'name/version'")


def resolve_model(ref: str | Path, settings: Any = None) -> Path:
    """A local pipeline folder for ``ref``: an existing folder, ``name@alias``, ``name/version``, or the
    ``s3://`` URL of an export published to object storage.

    Registry versions are downloaded once into ``$OMNIDIFF_HOME/model_cache/``
    (keyed by tracking store, name, version, source and creation time, so a
    reset registry that reuses version numbers never hits a stale copy). An ``s3://`` export is
    downloaded once into ``$OMNIDIFF_HOME/model_cache/s3/<digest16>/``, keyed by the digest of its
    manifest (``omnidiff.contracts.storage.fetch_folder``; endpoint and credentials from the AWS
    environment variables unless ``settings`` gives them); an export without a manifest is refused.
    """
    from omnidiff.contracts.storage import StorageError, fetch_folder, is_remote, open_folder

    if is_remote(ref):
        try:
            return fetch_folder(open_folder(str(ref), settings), subdir("model_cache", "s3"))
        except StorageError as exc:
            raise TrackingError(f"model ref {ref!r}: {exc}") from None
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    ref = str(ref)
    version = model_version(ref)
    key = hashlib.sha256(
        json.dumps([tracking_uri(), version.name, version.version, version.source, version.creation_timestamp]).encode()
    ).hexdigest()[:12]
    target = subdir("model_cache", version.name) / f"v{version.version}-{key}"
    if target.is_dir():
        return target
    import mlflow.artifacts

    staging = Path(tempfile.mkdtemp(prefix=f".v{version.version}-", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(staging),
            tracking_uri=tracking_uri(),
        )
        if not any(staging.iterdir()):
            raise TrackingError(f"model ref {ref!r}: version {version.version} has no files (source {version.source})")
        staging.rename(target)  # complete or absent: never a half-downloaded folder
    except OSError:
        if not target.is_dir():  # lost a race with another process: theirs is as good
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = [
    "EXPERIMENT",
    "RUN_RECORD",
    "TrackingError",
    "claim_folder",
    "close_superseded",
    "experiment_id",
    "git_commit",
    "log_figure",
    "log_json",
    "model_version",
    "prefect_flow_run_id",
    "register_model",
    "resolve_model",
    "set_tags",
    "start_run",
    "tracking_uri",
]
