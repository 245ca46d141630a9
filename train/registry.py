"""Register a stage's export in the MLflow model registry with lineage tags (docs/architecture.md "Registry").

The version gets the alias from the config (``candidate``), a per-stage alias (``stage1``..``stage3``,
so the next stage can start from ``omnidiff-tiny@stage1``), and tags that point both ways:
``stage``, ``run_id`` (the training run), ``snapshot_digest``, ``cache_fingerprint`` (the LLM cache),
``target_cache_fingerprint`` (the stage's CLIP or pixel cache), ``parent_model`` (the stage this one
started from: the previous stage's export, or the base model), ``parent_run_id``.
"""

from __future__ import annotations

from pathlib import Path


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
