"""The pieces the stages use on object storage (issue 17 item 2), against a real SeaweedFS server, no stage run:
``CacheStore.verify`` of an ``s3://`` cache, published folders (exports) and checkpoint tags committed by a
manifest written last, the ``storage:`` config section and its ``s3://`` locations.

    .venv/bin/pytest tests/test_storage_s3_stages.py -x -q        (starts `weed server`, ~15 s)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from omnidiff.config import ConfigError, load_config, to_dict
from omnidiff.contracts.storage import StorageError, fetch_folder, open_folder, publish_folder

ENCODER = {"model_id": "m", "weights_digest": "abc", "layer": 2, "max_length": 512, "dtype": "float32",
           "template": "raw", "normaliser_version": "1"}


def _cache(prefix: str) -> str:
    from embed_cache.writer import open_writer
    from omnidiff.contracts.cache import cache_dir, states_table
    from omnidiff.contracts.encoders import fingerprint, llm_inputs

    inputs = llm_inputs(ENCODER)
    directory = cache_dir("llm", fingerprint(inputs), f"{prefix}/cache")
    rng = np.random.default_rng(0)
    with open_writer(directory, inputs) as writer:
        writer.set_value_shape((8,))
        for unit in range(3):
            keys = [f"k{unit}-{i}" for i in range(5)]
            writer.write(states_table(keys, [rng.standard_normal((3 + i, 8)) for i in range(5)]), unit)
    return directory


def test_verify_reads_an_s3_cache_and_names_a_corrupt_shard(s3_prefix):
    from omnidiff.contracts.cache import CacheStore, CorruptShardError

    directory = _cache(s3_prefix)
    report = CacheStore(directory).verify()
    assert report.ok and report.shards == 3 and report.rows == 15 and report.unlisted == []
    folder = open_folder(directory)
    names = CacheStore(directory).shard_names
    folder.write_bytes(f"shards/{names[1]}", b"not parquet at all")  # a bad object under a listed name
    folder.write_bytes("shards/part-20990101T000000000000-000001.parquet", b"left by a killed writer")
    report = CacheStore(directory).verify()
    assert set(report.corrupt) == {names[1]} and "size" in report.corrupt[names[1]]
    assert report.unlisted == ["part-20990101T000000000000-000001.parquet"]
    with pytest.raises(CorruptShardError, match=names[1]) as err:
        report.raise_if_corrupt()
    assert str(err.value.cache).startswith("s3://")


def test_embed_verify_command_repairs_an_s3_cache(s3_prefix, capsys):
    from embed_cache.cli import main
    from omnidiff.contracts.cache import CacheStore

    directory = _cache(s3_prefix)
    assert main(["verify", directory]) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == directory
    bad = CacheStore(directory).shard_names[0]
    open_folder(directory).write_bytes(f"shards/{bad}", b"broken")
    assert main(["verify", directory, "--repair"]) == 1
    store = CacheStore(directory)
    assert bad not in store.shard_names and len(store) == 10 and store.verify().ok  # its keys: to compute again
    assert open_folder(directory).exists(f"shards/{bad}.corrupt")


def test_a_published_folder_is_fetched_once_by_its_digest(s3_prefix, tmp_path):
    src = tmp_path / "export"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "model.safetensors").write_bytes(b"\x01" * 1000)
    (src / "model_index.json").write_text('{"a": 1}')
    folder = open_folder(f"{s3_prefix}/exports/one")
    manifest = publish_folder(src, folder)
    assert [f["path"] for f in manifest["files"]] == ["model_index.json", "unet/model.safetensors"]
    got = fetch_folder(folder, tmp_path / "cache")
    assert got.name == manifest["digest"][:16]
    assert (got / "unet" / "model.safetensors").read_bytes() == b"\x01" * 1000
    assert fetch_folder(folder, tmp_path / "cache") == got  # cached: no second download

    (src / "model_index.json").write_text('{"a": 2}')  # republished: a new digest, a new copy
    assert fetch_folder(folder, tmp_path / "cache") == got  # (not yet published: the old manifest rules)
    publish_folder(src, folder)
    again = fetch_folder(folder, tmp_path / "cache")
    assert again != got and json.loads((again / "model_index.json").read_text()) == {"a": 2}

    folder.write_bytes("unet/model.safetensors", b"\x02" * 1000)  # tampered after publishing
    with pytest.raises(StorageError, match="sha256"):
        fetch_folder(folder, tmp_path / "other-cache")
    assert not (tmp_path / "other-cache").exists() or not any((tmp_path / "other-cache").iterdir())
    unfinished = open_folder(f"{s3_prefix}/exports/unfinished")
    unfinished.write_bytes("model_index.json", b"{}")  # objects, no manifest: a writer that died
    with pytest.raises(StorageError, match="folder_manifest.json"):
        fetch_folder(unfinished, tmp_path / "cache")


def test_a_checkpoint_tag_counts_only_once_its_manifest_is_written(s3_prefix, tmp_path):
    from train.checkpoint import fetch_dir, latest_tag, publish_dir

    remote = open_folder(f"{s3_prefix}/checkpoints/run")
    local = tmp_path / "work" / "step00000002"
    local.mkdir(parents=True)
    (local / "mp_rank_00_model_states.pt").write_bytes(b"m" * 300)
    (local / "omnidiff_meta.json").write_text('{"step": 2}')
    remote.upload(local / "mp_rank_00_model_states.pt", "step00000002/mp_rank_00_model_states.pt")
    remote.write_bytes("latest", b"step00000002")
    assert latest_tag(tmp_path / "work", remote) is None  # killed before its manifest: not a checkpoint
    publish_dir(local, remote, "step00000002")
    assert latest_tag(tmp_path / "work", remote) == "step00000002"
    elsewhere = tmp_path / "other-machine" / "step00000002"
    fetch_dir(remote, "step00000002", elsewhere)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mp_rank_00_model_states.pt", "omnidiff_meta.json"]
    (elsewhere / "stale.pt").write_bytes(b"x")  # a local copy that differs from the manifest is replaced
    fetch_dir(remote, "step00000002", elsewhere)
    assert not (elsewhere / "stale.pt").exists()


def test_storage_section_takes_s3_urls_and_keeps_the_secret_out_of_the_logged_config(tmp_path):
    from embed_cache.config import EmbedConfig
    from train.config import TrainConfig

    cfg = load_config(EmbedConfig, Path("configs/embed_test.yaml"), [
        "storage.root=s3://omnidiff-bucket/team/run", "storage.s3.secret_access_key=hunter2-secret"])
    assert cfg.storage.under(cfg.cache_root, "cache") == "s3://omnidiff-bucket/team/run/cache"
    assert "hunter2-secret" not in json.dumps(to_dict(cfg)) and "hunter2-secret" not in repr(cfg)
    assert cfg.storage.s3.secret_access_key.get_secret_value() == "hunter2-secret"
    train = load_config(TrainConfig, Path("configs/train_test_stage1.yaml"),
                        ["checkpoint.dir=s3://omnidiff-bucket/ckpt/", f"registry.export_dir={tmp_path}"])
    assert train.checkpoint.dir == "s3://omnidiff-bucket/ckpt" and train.registry.export_dir == tmp_path
    for bad, why in (("s3://ab/x", "bucket name"), ("gs://bucket/x", "only local paths and s3://")):
        with pytest.raises(ConfigError, match=why) as err:
            load_config(TrainConfig, Path("configs/train_test_stage1.yaml"), [f"checkpoint.dir={bad}"])
        assert "checkpoint.dir" in str(err.value)
