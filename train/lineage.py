"""MLflow and lineage of a training stage: ``lineage.json``, the run's inputs, loss curves, and the
workers' metric writer (:class:`Tracker`).

Lineage runs both ways (DESIGN.md): the export's ``lineage.json`` names its run, snapshot, caches,
LLM, base model and parent (as registry references where registered), and the run logs the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from train.config import TrainConfig
from train.inputs import StageInputs


def registry_ref(ref: str | None, folder_run_id: str | None, tracked: bool) -> str | None:
    """``name/version`` of a model given as a registry reference, or of the version its run registered.

    The lineage query (flows/lineage.py) walks ``parent_model`` tags as registry references, so a
    parent given as a folder (the pipeline passes export folders) is traced to its version through
    the MLflow run that produced it (``lineage.json``'s ``run_id``). None when it was never registered.
    """
    if not ref or not tracked:
        return None
    from omnidiff import tracking

    if not Path(ref).expanduser().exists() and tracking.is_model_ref(ref):
        version = tracking.model_version(ref)
        return f"{version.name}/{version.version}"
    if folder_run_id:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking.tracking_uri())
        versions = client.search_model_versions(f"run_id = '{folder_run_id}'")
        if versions:
            newest = max(versions, key=lambda v: int(v.version))
            return f"{newest.name}/{newest.version}"
    return None


def base_model_lineage(folder: Path) -> dict:
    """What a base model folder says about its making: its ``lineage.json``, and for a base model this
    project pretrained (omnidiff/base/pretrain.py) the MLflow run named in its ``base.json``."""
    out = {}
    if (folder / "lineage.json").is_file():
        out = json.loads((folder / "lineage.json").read_text())
    if not out.get("run_id") and (folder / "base.json").is_file():
        meta = json.loads((folder / "base.json").read_text())
        if meta.get("mlflow_run_id"):
            out = {**out, "run_id": meta["mlflow_run_id"], "stage": out.get("stage") or "base-pretrain"}
    return out


def lineage(cfg: TrainConfig, inputs: StageInputs, run_id: str | None) -> dict:
    """``lineage.json`` of the export: the run, its inputs, and the parent's lineage one level up."""
    base_lineage = base_model_lineage(inputs.base_model)
    parent = None
    if inputs.init_from is not None:
        parent_run = inputs.parent_lineage.get("run_id")
        ref = inputs.init_ref or cfg.init_from  # init_from: auto, resolved
        parent = {"ref": ref, "path": str(inputs.init_from), "run_id": parent_run,
                  "stage": inputs.parent_lineage.get("stage"), "model": registry_ref(ref, parent_run, cfg.track)}
    return {
        "stage": cfg.stage,
        "name": cfg.name,
        "run_id": run_id,
        "snapshot": {"name": inputs.snapshot.name, "digest": inputs.snapshot.digest, "path": str(inputs.snapshot.path)},
        "caches": {k: s.fingerprint for k, s in inputs.stores.items()},
        "llm": inputs.llm_encoder_inputs,
        "base_model": {"ref": cfg.base_model, "path": str(inputs.base_model), "run_id": base_lineage.get("run_id"),
                       "model": registry_ref(cfg.base_model, base_lineage.get("run_id"), cfg.track)},
        "parent": parent,
        "examples": len(inputs.examples),
    }


def log_inputs(cfg: TrainConfig, inputs: StageInputs, lin: dict) -> None:
    """The run's tags, params and MLflow dataset input (the example table), and ``lineage.json``."""
    import mlflow
    import mlflow.data

    from omnidiff import tracking

    # What it read, readable back by flows/lineage.py: the snapshot, each cache by fingerprint and folder,
    # the base model's pretraining run.
    mlflow.set_tags({"snapshot_digest": inputs.snapshot.digest, "parent_model": inputs.init_ref or cfg.base_model,
                     "parent_run_id": (lin.get("parent") or {}).get("run_id") or "",
                     "base_run_id": lin["base_model"].get("run_id") or "",
                     **{f"cache_fingerprint.{k}": s.fingerprint for k, s in inputs.stores.items()}})
    dataset = mlflow.data.from_pandas(inputs.examples, source=str(inputs.snapshot.path),
                                      name=f"{inputs.snapshot.name}@{inputs.snapshot.digest[:12]}")
    mlflow.log_input(dataset, context=f"train-stage{cfg.stage}")
    mlflow.log_params({"examples": len(inputs.examples), "snapshot_digest": inputs.snapshot.digest,
                       "snapshot_path": str(inputs.snapshot.path),
                       **{f"cache_fingerprint.{k}": s.fingerprint for k, s in inputs.stores.items()},
                       **{f"cache_dir.{k}": _where(s.path) for k, s in inputs.stores.items()}})
    tracking.log_json(lin, "lineage.json")


def log_curves(run_id: str, title: str) -> None:
    """A loss-curve picture (train loss and val loss by step) beside the metrics, for reports and the UI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    from omnidiff import tracking

    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "val_loss"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], marker="o", markersize=3, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    tracking.log_figure(fig, "curves/loss.png", run_id=run_id)
    plt.close(fig)


class Tracker:
    """Rank 0's MLflow writer into the driver's run (``MlflowClient``: no active-run state in the worker).

    Without a run id (``track: false``) every call does nothing.
    """

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.client = None
        if run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def figure(self, fig, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_figure(self.run_id, fig, artifact_file)

    def json(self, obj, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_dict(self.run_id, obj, artifact_file)


def _where(path) -> str:
    """A cache's place for a tag: a local folder resolved, an ``s3://`` URL as it is."""
    from omnidiff.contracts.storage import is_remote

    return str(path) if is_remote(path) else str(Path(path).resolve())
