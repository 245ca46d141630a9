"""Register a stage's export in the MLflow model registry with lineage tags (docs/architecture.md "Registry").

The registered model is ``registry.model_name``, or when that is null the run's own data's:
``omnidiff-<snapshot name>`` (:func:`model_name_for`; the demo's snapshot ``tiny`` gives
``omnidiff-tiny``), so a run on another data set never adds versions to the demo's model (issue 16
item 8). The version gets the alias from the config (``candidate``), a per-stage alias
(``stage1``..``stage3``, so the next stage's ``init_from: auto`` starts from ``<model>@stage1``), and
tags that point both ways:
``stage``, ``run_id`` (the training run), ``snapshot_digest``, ``cache_fingerprint`` (the LLM cache),
``target_cache_fingerprint`` (the stage's CLIP or pixel cache), ``parent_model`` (the stage this one
started from: the previous stage's export, or the base model), ``parent_run_id``.
"""

from __future__ import annotations

import re
from pathlib import Path

INIT_FROM_AUTO = "auto"  # init_from: the previous stage of this run's own model (parent_ref)


def snapshot_name_of(ref: str) -> str:
    """The name of the snapshot ``ref`` (data.snapshot) names: a snapshot folder's manifest name, else ``ref``."""
    from omnidiff.contracts.snapshot import Snapshot

    if "://" in ref or Path(ref).expanduser().is_dir():
        return Snapshot.open(Path(ref).expanduser() if "://" not in ref else ref, verify=False).name
    return ref


def model_name_for(cfg, snapshot_name: str | None = None) -> str:
    """The registered model a training run (TrainConfig ``cfg``) registers into: ``registry.model_name``,
    or ``omnidiff-<snapshot name>`` when that is null (``snapshot_name``: the opened snapshot's, else
    read from ``data.snapshot``)."""
    if cfg.registry.model_name:
        return cfg.registry.model_name
    name = snapshot_name if snapshot_name is not None else snapshot_name_of(cfg.data.snapshot)
    return "omnidiff-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "data")


def parent_ref(cfg, snapshot_name: str | None = None) -> str | None:
    """What ``init_from`` names: ``auto`` -> ``<model_name_for(cfg)>@stage<N-1>`` (None for stage 1), else itself."""
    if cfg.init_from != INIT_FROM_AUTO:
        return cfg.init_from
    if cfg.stage == 1:
        return None
    return f"{model_name_for(cfg, snapshot_name)}@stage{cfg.stage - 1}"


def lineage_tags(lineage: dict) -> dict[str, str]:
    """Registry tags from a ``lineage.json`` dict (train.lineage builds it)."""
    caches = lineage.get("caches", {})
    parent = lineage.get("parent") or lineage.get("base_model") or {}
    base = lineage.get("base_model") or {}
    tags = {
        "stage": str(lineage["stage"]),
        "run_id": str(lineage.get("run_id") or ""),
        "snapshot_digest": str(lineage["snapshot"]["digest"]),
        "cache_fingerprint": str(caches.get("llm", "")),
        "target_cache_fingerprint": str(caches.get("clip") or caches.get("pixels") or ""),
        # a registry reference (name/version) where the parent is registered, so lineage queries can walk it
        "parent_model": str(parent.get("model") or parent.get("ref") or ""),
        "parent_path": str(parent.get("path") or ""),
        "parent_run_id": str(parent.get("run_id") or ""),
        "base_model": str(base.get("model") or base.get("ref") or ""),
    }
    return {k: v for k, v in tags.items() if v}


def register_export(export_dir: Path, model_name: str, aliases: list[str], lineage: dict, run_id: str) -> str:
    """New version of ``model_name`` from ``export_dir`` carrying ``aliases``; returns the version number."""
    from mlflow import MlflowClient

    from omnidiff import tracking

    version = tracking.register_model(Path(export_dir), model_name, alias=aliases[0], tags=lineage_tags(lineage),
                                      run_id=run_id)
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    for alias in aliases[1:]:
        client.set_registered_model_alias(model_name, alias, version)
    return version
