"""Register a stage's export in the MLflow model registry with lineage tags (docs/architecture.md "Registry").

The version gets the alias from the config (``candidate``) and tags that point both ways:
``stage``, ``run_id`` (the training run), ``snapshot_digest``, ``cache_fingerprint`` (the LLM cache),
``target_cache_fingerprint`` (the stage's CLIP or pixel cache), ``parent_model`` (the stage this one
started from: the previous stage's export, or the base model), ``parent_run_id``.
"""

from __future__ import annotations

from pathlib import Path


def lineage_tags(lineage: dict) -> dict[str, str]:
    """Registry tags from a ``lineage.json`` dict (train.ray_job builds it)."""
    caches = lineage.get("caches", {})
    parent = lineage.get("parent") or lineage.get("base_model") or {}
    tags = {
        "stage": str(lineage["stage"]),
        "run_id": str(lineage.get("run_id") or ""),
        "snapshot_digest": str(lineage["snapshot"]["digest"]),
        "cache_fingerprint": str(caches.get("llm", "")),
        "target_cache_fingerprint": str(caches.get("clip") or caches.get("pixels") or ""),
        "parent_model": str(parent.get("ref", "")),
        "parent_run_id": str(parent.get("run_id") or ""),
        "base_model": str(lineage.get("base_model", {}).get("ref", "")),
    }
    return {k: v for k, v in tags.items() if v}


def register_export(export_dir: Path, model_name: str, alias: str, lineage: dict, run_id: str) -> str:
    """New version of ``model_name`` from ``export_dir`` with ``alias``; returns the version number."""
    from omnidiff import tracking

    return tracking.register_model(Path(export_dir), model_name, alias=alias, tags=lineage_tags(lineage), run_id=run_id)
