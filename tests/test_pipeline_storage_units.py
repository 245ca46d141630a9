"""The pipeline's ``storage:`` section without a server (flows/pipeline.py; the flow on SeaweedFS is
tests/test_pipeline_s3.py): which stages take it, where training folders go, the stage index in a folder.

    .venv/bin/pytest tests/test_pipeline_storage_units.py -q
"""

from __future__ import annotations

from pathlib import Path

from omnidiff.config import load_config, replace

REPO = Path(__file__).resolve().parents[1]


def _pipeline(*overrides: str):
    from flows.config import load_pipeline_config

    return load_pipeline_config(REPO / "configs" / "pipeline_test.yaml", list(overrides))


def test_the_pipeline_storage_goes_to_every_stage_without_a_root_of_its_own():
    from flows.pipeline import with_storage
    from omnidiff.contracts.storage import StorageSection

    cfg = _pipeline("storage.root=s3://bucket-x/prefix", "storage.s3.endpoint_url=http://127.0.0.1:9")
    for stage in (cfg.collect, cfg.embed, cfg.stage1, cfg.stage2, cfg.stage3):
        assert stage.storage.root is None
        moved = with_storage(stage, cfg.storage)
        assert moved.storage.root == "s3://bucket-x/prefix" and moved.storage.s3.endpoint_url == "http://127.0.0.1:9"
    own = replace(cfg.embed, storage=StorageSection(root="s3://bucket-y/own"))
    assert with_storage(own, cfg.storage).storage.root == "s3://bucket-y/own"  # the stage's own root wins
    local = _pipeline()
    assert local.storage.root is None and with_storage(local.embed, local.storage) == local.embed


def test_training_folders_go_under_the_storage_root_per_input_set(tmp_path, monkeypatch):
    from flows.pipeline import _per_input_folders, input_digest, with_storage

    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path / "home"))
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    cfg = _pipeline("storage.root=s3://bucket-x/prefix")
    stage = with_storage(cfg.stage1, cfg.storage)
    placed = _per_input_folders("stage1", stage, [manifest])
    digest = input_digest("stage1", stage, [manifest])[:12]
    assert placed.checkpoint.dir == f"s3://bucket-x/prefix/checkpoints/{stage.name}/{digest}"
    assert placed.registry.export_dir == f"s3://bucket-x/prefix/exports/{stage.name}/{digest}"
    local_root = _pipeline(f"storage.root={tmp_path / 'store'}")
    placed = _per_input_folders("stage1", with_storage(local_root.stage1, local_root.storage), [manifest])
    assert Path(placed.checkpoint.dir).parent == tmp_path / "store" / "checkpoints" / stage.name
    assert not (tmp_path / "home" / "checkpoints").exists()


def test_the_stage_index_in_a_folder_reuses_only_outputs_that_are_there(tmp_path):
    from flows.pipeline import StageIndex, committed
    from omnidiff.contracts.storage import open_folder

    index = StageIndex(folder=open_folder(tmp_path / "pipeline"))
    output = tmp_path / "export"
    output.mkdir()
    index.put("stage1", "abc", {"export_dir": str(output)}, [str(output)])
    assert (tmp_path / "pipeline" / "stage_index.json").is_file()
    assert StageIndex(folder=open_folder(tmp_path / "pipeline")).get("stage1", "abc") == {"export_dir": str(output)}
    assert index.get("stage1", "other") is None and index.get("stage2", "abc") is None
    output.rmdir()
    assert not committed(output) and index.get("stage1", "abc") is None  # gone: run the stage again


def test_the_shipped_s3_pipeline_config_puts_everything_under_one_prefix():
    from flows.config import PipelineConfig

    cfg = load_config(PipelineConfig, REPO / "configs" / "s3" / "pipeline.yaml")
    assert cfg.storage.root == "s3://omnidiff/tiny" and cfg.storage.remote
    assert all(getattr(cfg, s).storage.root is None for s in ("collect", "embed", "stage1", "stage2", "stage3"))
