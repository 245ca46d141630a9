"""Registry names and ``init_from`` follow the run's own data, not the demo's ``omnidiff-tiny`` (issue 16 item 8).

A stage trained on another snapshot with the shipped configs registers ``omnidiff-<snapshot name>``, and
stages 2-3 (``init_from: auto``) start from that model's previous stage, never from the demo's; the demo's
snapshot ``tiny`` still gives ``omnidiff-tiny`` and ``omnidiff-tiny@stage1``.
"""

from __future__ import annotations

import pytest

from omnidiff.config import load_config
from train.config import TrainConfig
from train.registry import model_name_for, parent_ref, snapshot_name_of


def _stage(n: int, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, f"configs/train_stage{n}.yaml", list(overrides))


def test_the_demo_configs_keep_their_names():
    for n in (1, 2, 3):
        assert _stage(n).registry.model_name is None and model_name_for(_stage(n)) == "omnidiff-tiny"
    assert parent_ref(_stage(1)) is None
    assert parent_ref(_stage(2)) == "omnidiff-tiny@stage1" and parent_ref(_stage(3)) == "omnidiff-tiny@stage2"


def test_another_snapshot_names_its_own_model_and_parent():
    cfg = _stage(2, "data.snapshot=fashion-mnist")
    assert model_name_for(cfg) == "omnidiff-fashion-mnist" and parent_ref(cfg) == "omnidiff-fashion-mnist@stage1"
    assert parent_ref(_stage(3, "data.snapshot=fashion")) == "omnidiff-fashion@stage2"
    named = _stage(2, "data.snapshot=fashion", "registry.model_name=my-model")
    assert model_name_for(named) == "my-model" and parent_ref(named) == "my-model@stage1"  # a named model wins
    explicit = _stage(2, "data.snapshot=fashion", "init_from=omnidiff-tiny@stage1")
    assert parent_ref(explicit) == "omnidiff-tiny@stage1"  # an explicit parent is taken as given
    assert model_name_for(_stage(1, "data.snapshot=laion 2B/ml"), "laion 2B/ml") == "omnidiff-laion-2B-ml"


def test_a_snapshot_folder_is_named_by_its_manifest(tmp_path):
    from tests.fixtures_embed import write_snapshot

    folder = write_snapshot("fashion", [{"caption": "a grayscale photo of a sneaker"}], root=tmp_path)
    assert snapshot_name_of(str(folder)) == "fashion"
    assert model_name_for(_stage(2, f"data.snapshot={folder}")) == "omnidiff-fashion"


def test_auto_resolves_to_the_model_this_data_registered(tmp_path):
    """What a stage-1 run on snapshot ``fashion`` registers (name and stage alias, as train/launch.py
    does) is what stage 2's ``init_from: auto`` loads."""
    import mlflow

    from omnidiff.tracking import register_model, resolve_model, start_run

    export = tmp_path / "export"
    (export / "adapter").mkdir(parents=True)
    (export / "adapter" / "config.json").write_text("{}")
    stage1 = _stage(1, "data.snapshot=fashion", "track=true")
    with start_run("train", run_name="names-test"):
        register_model(export, model_name_for(stage1, "fashion"), alias="stage1",
                       run_id=mlflow.active_run().info.run_id)
    folder = resolve_model(parent_ref(_stage(2, "data.snapshot=fashion"), "fashion"))
    assert (folder / "adapter" / "config.json").is_file()


def test_auto_without_a_parent_of_this_data_says_what_to_train(sd15_base, tmp_path):
    from tests.fixtures_embed import write_snapshot
    from train.inputs import TrainingError, resolve_inputs

    folder = write_snapshot("pets", [{"caption": "a small dog on a red sofa"}], root=tmp_path)
    cfg = _stage(2, f"base_model={sd15_base}", f"data.snapshot={folder}")
    with pytest.raises(TrainingError, match=r"init_from=auto: the stage-1 model of this run's data is "
                                            r"omnidiff-pets@stage1 \(snapshot 'pets'\).*Train stage 1 on this snapshot"):
        resolve_inputs(cfg)
