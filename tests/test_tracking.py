"""MLflow helpers against the real tracking server of the session stack (and the local SQLite fallback).

    .venv/bin/pytest tests/test_tracking.py -x -q
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

from omnidiff import config as config_lib
from omnidiff import tracking


@dataclasses.dataclass(frozen=True)
class _InnerConfig:
    """Nested section: ``processes`` workers, ``sizes`` a tuple."""

    processes: int = 2
    sizes: tuple[int, ...] = (16, 32)


@dataclasses.dataclass(frozen=True)
class _DemoConfig:
    """A stage-like config to log."""

    kind: ClassVar[str] = "demo"
    name: str = "tiny"
    mode: Literal["fast", "slow"] = "fast"
    out_dir: Path = Path("exports/x")
    rate: float = 0.5
    inner: _InnerConfig = dataclasses.field(default_factory=_InnerConfig)


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _download_text(run_id: str, path: str, tmp_path: Path) -> str:
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path))
    return Path(local).read_text()


def _export_folder(root: Path, marker: str) -> Path:
    folder = root / f"export-{marker}"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "OmniDiffusionPipeline", "marker": marker}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(marker.encode() * 100)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_start_run_logs_config_params_tags_and_yaml(stack, tmp_path):
    cfg = config_lib.from_dict(_DemoConfig, {"name": "run-a", "inner": {"processes": 3}})
    with tracking.start_run("unit", config=cfg, tags={"purpose": "test"}) as run:
        run_id = run.info.run_id
    got = _client().get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "unit"
    exp = _client().get_experiment(got.info.experiment_id)
    assert exp.name == "omnidiff"
    assert got.data.params == {
        "kind": "demo", "name": "run-a", "mode": "fast", "out_dir": "exports/x", "rate": "0.5",
        "inner.processes": "3", "inner.sizes": "[16, 32]",
    }
    tags = got.data.tags
    assert tags["stage"] == "unit" and tags["purpose"] == "test"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["git.commit"].split("+")[0] == head
    assert "prefect.flow_run_id" not in tags  # not inside a flow run
    assert yaml.safe_load(_download_text(run_id, "config.yaml", tmp_path)) == config_lib.to_dict(cfg)


def test_nested_runs_and_failed_status(stack):
    with tracking.start_run("pipeline", run_name="parent") as parent:
        with tracking.start_run("collect") as implicit_child:  # nests under the active run
            pass
    with tracking.start_run("train", parent_run_id=None) as unrelated:
        pass
    client = _client()
    assert client.get_run(implicit_child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "mlflow.parentRunId" not in client.get_run(unrelated.info.run_id).data.tags

    with pytest.raises(ZeroDivisionError):
        with tracking.start_run("broken") as broken:
            1 / 0  # noqa: B018
    assert client.get_run(broken.info.run_id).info.status == "FAILED"


def test_explicit_parent_run_id_from_another_process(stack):
    import mlflow

    with tracking.start_run("pipeline") as parent:
        parent_id = parent.info.run_id
        # What a Ray worker or torchrun child does: it knows only the parent's id.
        code = (
            "from omnidiff import tracking\n"
            f"with tracking.start_run('train', parent_run_id={parent_id!r}) as r: print('RUN', r.info.run_id)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    child_id = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("RUN "))
    assert mlflow.get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id


def test_prefect_flow_run_id_is_tagged(stack):
    from prefect import flow

    @flow(name="omnidiff-tracking-test")
    def traced() -> tuple[str, str]:
        from prefect.runtime import flow_run

        with tracking.start_run("flowed") as run:
            return run.info.run_id, str(flow_run.id)

    run_id, flow_run_id = traced()
    assert _client().get_run(run_id).data.tags["prefect.flow_run_id"] == flow_run_id


def test_log_figure_and_json(stack, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    payload = {"accuracy": {"en": 0.9, "zh": 0.2}, "path": Path("/x/y"), "caption": "红色的圆"}
    with tracking.start_run("report") as run:
        tracking.log_figure(fig, "plots/curve.png")
        tracking.log_json(payload, "metrics/summary.json")
    plt.close(fig)
    names = {a.path for a in _client().list_artifacts(run.info.run_id, "plots")}
    assert names == {"plots/curve.png"}
    png = Path(_client().download_artifacts(run.info.run_id, "plots/curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(_download_text(run.info.run_id, "metrics/summary.json", tmp_path / "j")) == {
        "accuracy": {"en": 0.9, "zh": 0.2}, "path": "/x/y", "caption": "红色的圆",
    }


def test_logging_without_a_run_is_a_clear_error():
    with pytest.raises(tracking.TrackingError, match="log_json: no active MLflow run"):
        tracking.log_json({"a": 1}, "a.json")


def test_register_alias_and_resolve(stack, tmp_path):
    name = f"omnidiff-test-{uuid.uuid4().hex[:8]}"
    first, second = _export_folder(tmp_path, "one"), _export_folder(tmp_path, "two")
    with tracking.start_run("train") as run:
        v1 = tracking.register_model(first, name, alias="candidate", tags={"stage": "2", "snapshot_digest": "abc"})
    client = _client()
    mv = client.get_model_version(name, v1)
    assert mv.run_id == run.info.run_id
    assert mv.tags == {"stage": "2", "snapshot_digest": "abc", "run_id": run.info.run_id}
    assert {a.path for a in client.list_artifacts(run.info.run_id, f"exports/{name}")} >= {
        f"exports/{name}/model_index.json", f"exports/{name}/unet",
    }

    resolved = tracking.resolve_model(f"{name}@candidate")
    assert _files(resolved) == _files(first)
    assert tracking.resolve_model(f"{name}/{v1}") == resolved  # same version, same cache entry
    assert tracking.resolve_model(f"models:/{name}@candidate") == resolved

    # A new version takes the alias over; given run_id (no active run).
    v2 = tracking.register_model(second, name, alias="candidate", run_id=run.info.run_id)
    assert int(v2) == int(v1) + 1
    assert client.get_model_version_by_alias(name, "candidate").version == v2
    assert _files(tracking.resolve_model(f"{name}@candidate")) == _files(second)
    assert _files(tracking.resolve_model(f"{name}/{v1}")) == _files(first)

    # An existing folder is used as it is.
    assert tracking.resolve_model(first) == first.resolve()
    assert tracking.resolve_model(str(first)) == first.resolve()


def test_resolve_a_version_registered_the_mlflow3_way(stack, tmp_path):
    """A LoggedModel version (source models:/m-<id>, NOTES.md) resolves like ours."""
    name = f"omnidiff-test-{uuid.uuid4().hex[:8]}"
    folder = _export_folder(tmp_path, "logged")
    client = _client()
    with tracking.start_run("train") as run:
        logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run.info.run_id)
        client.log_model_artifacts(logged.model_id, str(folder))
        client.finalize_logged_model(logged.model_id, "READY")
        client.create_registered_model(name)
        mv = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run.info.run_id,
                                         model_id=logged.model_id)
    assert mv.source.startswith("models:/m-")
    assert _files(tracking.resolve_model(f"{name}/{mv.version}")) == _files(folder)


def test_bad_references_and_folders_are_named(stack, tmp_path):
    with pytest.raises(tracking.TrackingError, match="model ref 'no such thing'"):
        tracking.resolve_model("no such thing")
    with pytest.raises(tracking.TrackingError, match=r"model ref 'missing-model@candidate': not in the registry"):
        tracking.resolve_model("missing-model@candidate")
    empty = tmp_path / "empty"
    empty.mkdir()
    with tracking.start_run("train"):
        with pytest.raises(tracking.TrackingError, match="export_dir=.*empty.*not a non-empty folder"):
            tracking.register_model(empty, "whatever")


def test_without_the_stack_runs_go_to_sqlite_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with tracking.start_run("offline", tags={"k": "v"}) as run:
        tracking.log_json({"ok": True}, "ok.json")
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    from mlflow import MlflowClient

    got = MlflowClient(uri).get_run(run.info.run_id)
    assert got.data.tags["stage"] == "offline"
    assert (tmp_path / "home" / "mlflow" / "artifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


# ----------------------------------------------------------------------------- runs that take a folder over


def _dead_process() -> dict:
    """The pid and create time of a process that has exited (what a SIGKILLed driver leaves in its record)."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    create_time = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait(timeout=30)
    return {"pid": proc.pid, "create_time": create_time}


def test_a_run_left_running_by_a_dead_process_is_closed_and_linked_both_ways(stack, tmp_path):
    client = _client()
    killed = client.create_run(tracking.experiment_id(), tags={"stage": "embed"})  # RUNNING, as after a SIGKILL
    assert tracking.claim_folder(tmp_path, killed.info.run_id) is None  # nobody wrote the folder before
    record = json.loads((tmp_path / tracking.RUN_RECORD).read_text())
    assert record["run_id"] == killed.info.run_id and record["pid"] == os.getpid()
    (tmp_path / tracking.RUN_RECORD).write_text(json.dumps({**record, **_dead_process()}))

    with tracking.start_run("embed") as rerun:
        previous = tracking.claim_folder(tmp_path, rerun.info.run_id, run_stamp="x")
        closed = tracking.close_superseded(previous, rerun.info.run_id, "adopted 2 cache shards")
    assert closed == {"run_id": killed.info.run_id, "status": "KILLED", "was": "RUNNING"}
    old, new = client.get_run(killed.info.run_id), client.get_run(rerun.info.run_id)
    assert old.info.status == "KILLED" and old.data.tags["superseded_by"] == rerun.info.run_id
    assert new.data.tags["supersedes"] == killed.info.run_id
    assert new.data.tags["adopted"] == "adopted 2 cache shards"
    assert json.loads((tmp_path / tracking.RUN_RECORD).read_text())["run_stamp"] == "x"


def test_finished_and_live_previous_runs_are_left_alone(stack, tmp_path):
    client = _client()
    with tracking.start_run("embed") as finished:
        pass
    running = client.create_run(tracking.experiment_id(), tags={"stage": "train"})
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        alive = {"pid": live.pid, "create_time": psutil.Process(live.pid).create_time()}
        with tracking.start_run("embed") as rerun:
            assert tracking.close_superseded({"run_id": finished.info.run_id, **_dead_process()},
                                             rerun.info.run_id, "x") is None
            assert tracking.close_superseded({"run_id": running.info.run_id, **alive}, rerun.info.run_id, "x") is None
            assert tracking.close_superseded({"run_id": rerun.info.run_id}, rerun.info.run_id, "x") is None
    finally:
        live.kill()
        live.wait(timeout=30)
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"
    assert client.get_run(running.info.run_id).info.status == "RUNNING"  # its process still runs
    assert "superseded_by" not in client.get_run(running.info.run_id).data.tags
    assert "supersedes" not in client.get_run(rerun.info.run_id).data.tags
    client.set_terminated(running.info.run_id)


def test_a_failed_previous_run_keeps_its_status_and_gets_the_link(stack, tmp_path):
    client = _client()
    with pytest.raises(RuntimeError):
        with tracking.start_run("train") as failed:
            raise RuntimeError("boom")
    with tracking.start_run("train") as rerun:
        closed = tracking.close_superseded({"run_id": failed.info.run_id, **_dead_process()}, rerun.info.run_id,
                                           "resumed from step 4")
    assert closed == {"run_id": failed.info.run_id, "status": "FAILED", "was": "FAILED"}
    assert client.get_run(failed.info.run_id).data.tags["superseded_by"] == rerun.info.run_id


_HOLD_A_RUN = """
import sys, time
from omnidiff import tracking
with tracking.start_run("pipeline") as run:
    tracking.enter_live("pipeline", run.info.run_id)
    print(run.info.run_id, flush=True)
    if sys.argv[1] == "finish":
        tracking.leave_live("pipeline", run.info.run_id)
    else:
        time.sleep(120)
"""


def test_a_pipeline_run_whose_process_was_sigkilled_is_closed_by_the_next_one(stack, tmp_path):
    """Runs that own no folder (the pipeline's parent run) keep a live record; the next run of that
    kind closes the ones whose process died (KILLED, linked both ways) and leaves live and ended ones."""
    import signal

    client = _client()
    home = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def hold(mode: str):
        proc = subprocess.Popen([sys.executable, "-c", _HOLD_A_RUN, mode], stdout=subprocess.PIPE, text=True, env=home)
        return proc, proc.stdout.readline().strip()

    killed, killed_id = hold("sleep")
    live, live_id = hold("sleep")
    finished, finished_id = hold("finish")
    try:
        assert finished.wait(timeout=120) == 0
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert client.get_run(killed_id).info.status == "RUNNING"  # what a SIGKILL leaves in MLflow
        with tracking.start_run("pipeline") as rerun:
            closed = tracking.close_dead("pipeline", rerun.info.run_id, "kept stage outputs")
        assert closed == [{"run_id": killed_id, "status": "KILLED", "was": "RUNNING"}]
        old, new = client.get_run(killed_id), client.get_run(rerun.info.run_id)
        assert old.info.status == "KILLED" and old.data.tags["superseded_by"] == rerun.info.run_id
        assert new.data.tags["supersedes"] == killed_id and new.data.tags["adopted"] == "kept stage outputs"
        assert client.get_run(live_id).info.status == "RUNNING"  # its process still runs: left alone
        assert client.get_run(finished_id).info.status == "FINISHED"
        records = {p.stem for p in (tracking._live_dir("pipeline")).glob("*.json")}
        assert killed_id not in records and live_id in records and finished_id not in records
    finally:
        live.kill()
        live.wait(timeout=30)
