"""Pieces of the pipeline flow that need no running stack (flows/pipeline.py).

    .venv/bin/pytest tests/test_flows_units.py -q
"""

from __future__ import annotations

from pathlib import Path

from omnidiff.config import load_config, replace

REPO = Path(__file__).resolve().parents[1]


def _stage1(*overrides: str):
    from train.config import TrainConfig

    return load_config(TrainConfig, REPO / "configs" / "train_test_stage1.yaml", list(overrides))


def test_training_folders_are_per_input_set(tmp_path, monkeypatch):
    """A rerun with the same inputs resumes in the same checkpoint folder; other inputs (here: another
    base model) get fresh folders instead of refusing another training's checkpoints."""
    from flows.pipeline import _per_input_folders

    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path))
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    cfg = replace(_stage1(), base_model="/models/base/a")
    first, again = _per_input_folders("stage1", cfg, [manifest]), _per_input_folders("stage1", cfg, [manifest])
    assert first.checkpoint.dir == again.checkpoint.dir and first.registry.export_dir == again.registry.export_dir
    assert first.checkpoint.dir.parent == tmp_path / "checkpoints" / cfg.name
    assert first.registry.export_dir.parent == tmp_path / "exports" / cfg.name

    other = _per_input_folders("stage1", replace(cfg, base_model="/models/base/b"), [manifest])
    assert other.checkpoint.dir != first.checkpoint.dir and other.registry.export_dir != first.registry.export_dir

    manifest.write_text('{"rows": 1}')  # a new snapshot under the same path
    assert _per_input_folders("stage1", cfg, [manifest]).checkpoint.dir != first.checkpoint.dir

    pinned = _stage1(f"checkpoint.dir={tmp_path / 'mine'}")
    assert _per_input_folders("stage1", pinned, [manifest]).checkpoint.dir == tmp_path / "mine"


def test_a_seeded_demo_sets_every_training_and_evaluation_seed():
    """`make demo SEED=3` replicates the demo: the pipeline run gets the whole config with that seed in every
    training stage and the evaluation; an explicit override after it wins; no override leaves the deployment's own."""
    from flows.cli import demo_overrides, demo_parameters

    config = str(REPO / "configs" / "pipeline.yaml")
    assert demo_parameters(config, demo_overrides(None, [])) is None
    params = demo_parameters(config, demo_overrides(3, ["evaluate.bootstrap_seed=11"]))["config"]
    assert [params[s]["seed"] for s in ("stage1", "stage2", "stage3")] == [3, 3, 3]
    assert (params["evaluate"]["seed"], params["evaluate"]["bootstrap_seed"]) == (3, 11)
    plain = demo_parameters(config, ["stage2.max_steps=400"])["config"]
    assert plain["stage2"]["max_steps"] == 400 and plain["stage1"]["seed"] == 0


def test_a_bad_demo_override_fails_before_the_stack_starts(capsys, monkeypatch, tmp_path):
    import omnidiff.stack
    from flows.cli import demo_main

    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path))
    monkeypatch.setattr(omnidiff.stack, "up", lambda *a, **k: (_ for _ in ()).throw(AssertionError("stack started")))
    assert demo_main(["--config", str(REPO / "configs" / "pipeline.yaml"), "stage2.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
