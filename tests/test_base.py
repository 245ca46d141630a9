"""The base text-to-image model and its evaluator (omnidiff/base/, omnidiff/models/evaluator.py).

.venv/bin/pytest tests/test_base.py -x -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnidiff.config import ConfigError, load_config
from tests.fixtures_base import BASE_TEST_CONFIG, REPO, tiny_base_config


# -- config -----------------------------------------------------------------------------------
def test_shipped_base_configs_load_and_bad_values_are_named():
    from omnidiff.base.config import BaseConfig

    for path in (REPO / "configs" / "base.yaml", BASE_TEST_CONFIG):
        cfg = load_config(BaseConfig, path)
        assert cfg.resolution == 16
    with pytest.raises(ConfigError, match=r"pretrain\.caption_dropout=1\.5"):
        load_config(BaseConfig, BASE_TEST_CONFIG, ["pretrain.caption_dropout=1.5"])
    with pytest.raises(ConfigError, match=r"text_encoder\.heads=3"):
        load_config(BaseConfig, BASE_TEST_CONFIG, ["text_encoder.heads=3"])
    with pytest.raises(ConfigError, match="resolution=18"):
        load_config(BaseConfig, BASE_TEST_CONFIG, ["resolution=18", "unet.block_out_channels=[16, 32, 32]"])


# -- pretraining ------------------------------------------------------------------------------
def _fixed_batch_loss(models, images, captions, seed: int = 123) -> float:
    from omnidiff.base.pretrain import compute_loss

    text_encoder, unet, scheduler = models
    ids, mask = text_encoder.tokenize(captions)
    with torch.no_grad():
        return compute_loss(
            images, ids, mask, text_encoder, unet, scheduler, torch.Generator().manual_seed(seed)
        ).item()


def test_pretraining_on_a_tiny_budget_lowers_the_loss(tiny_world):
    from omnidiff.base.pretrain import build_models, load_pairs, train

    cfg = tiny_base_config(tiny_world, "pretrain.steps=40")
    images, captions = load_pairs(tiny_world, cfg.resolution)
    assert images.shape == (150, 3, 16, 16) and -1.0 <= images.min() and images.max() <= 1.0
    batch = (images[:64], captions[:64])
    before = _fixed_batch_loss(build_models(cfg), *batch)  # the same initial weights train() starts from
    result = train(cfg, images, captions)
    after = _fixed_batch_loss((result["text_encoder"], result["unet"], result["scheduler"]), *batch)
    assert len(result["losses"]) == 40
    assert after < 0.7 * before, (before, after)


def test_loss_targets_follow_the_prediction_type_and_min_snr_weights(tiny_world):
    """v-prediction regresses scheduler.get_velocity (not the noise); Min-SNR-gamma only ever
    down-weights, and a gamma above every step's SNR leaves the noise loss unchanged."""
    from omnidiff.base.pretrain import build_models, compute_loss, load_pairs

    images, captions = load_pairs(tiny_world, 16)
    images, captions = images[:16], captions[:16]

    def loss(*overrides, gamma=0.0):
        text_encoder, unet, scheduler = build_models(tiny_base_config(tiny_world, *overrides))
        assert scheduler.config.prediction_type == ("v_prediction" if "pretrain.prediction_type=v_prediction" in overrides else "epsilon")
        ids, mask = text_encoder.tokenize(captions)
        with torch.no_grad():
            return compute_loss(images, ids, mask, text_encoder, unet, scheduler,
                                torch.Generator().manual_seed(5), gamma).item()

    eps, v = loss("pretrain.prediction_type=epsilon"), loss("pretrain.prediction_type=v_prediction")
    assert eps != pytest.approx(v, rel=1e-3)  # same weights and draws, another target
    assert loss("pretrain.prediction_type=epsilon", gamma=1e12) == pytest.approx(eps, rel=1e-6)
    assert loss("pretrain.prediction_type=epsilon", gamma=1.0) < eps
    assert loss("pretrain.prediction_type=v_prediction", gamma=5.0) < v


def test_pretraining_is_seeded(tiny_world):
    from omnidiff.base.pretrain import load_pairs, train

    images, captions = load_pairs(tiny_world, 16)
    images, captions = images[:32], captions[:32]

    def weights(*overrides):
        result = train(tiny_base_config(tiny_world, "pretrain.steps=3", *overrides), images, captions)
        return {**result["unet"].state_dict(), **result["text_encoder"].state_dict()}

    a, b, c = weights(), weights(), weights("pretrain.seed=1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_base_model_is_a_clip_pipeline_folder(tiny_base_model, tiny_world):
    from omnidiff.pipeline import OmniDiffusionPipeline
    from omnidiff.world import load_world_meta, pairs_digest

    index = json.loads((tiny_base_model / "model_index.json").read_text())
    assert index["conditioning"] == "clip"
    meta = json.loads((tiny_base_model / "base.json").read_text())
    assert meta["record"]["pairs_digest"] == pairs_digest(tiny_world) and "world_digest" not in meta["record"]
    # The base is named by the world's pairs, not its whole digest: a world that differs only in text-only rows
    # (parallel texts, eval prompts) reuses it, so the world it records is one with these pairs, maybe not this one.
    assert len(meta["world_digest"]) == len(load_world_meta(tiny_world)["digest"]) == 64
    assert tiny_base_model.parent.name == "base" and tiny_base_model.name in str(tiny_base_model)
    pipe = OmniDiffusionPipeline.from_pretrained(tiny_base_model)
    prompts = ["a small red circle in the centre on a black background", "红色的圆形"]
    images = pipe(prompts, num_inference_steps=2, seed=3)
    assert [im.size for im in images] == [(16, 16), (16, 16)]
    again = pipe(prompts, num_inference_steps=2, seed=3)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    # English only, one hard 77-token window: Chinese is <unk>, words past token 75 are gone.
    enc = pipe.text_encoder
    ids, mask = enc.tokenize(["红色的圆形", " ".join(["circle"] * 200)])
    assert ids.shape == (2, 77)
    assert enc.tokenizer.unk_token_id in ids[0].tolist()
    assert int(mask[1].sum()) == 77


def test_pretrain_reuses_the_cached_folder(tiny_base_model, tiny_world, capsys):
    from omnidiff.base.pretrain import base_dir, pretrain

    cfg = tiny_base_config(tiny_world)
    stamp = (tiny_base_model / "base.json").stat().st_mtime_ns
    assert pretrain(cfg) == tiny_base_model == base_dir(cfg)
    assert "cached" in capsys.readouterr().out
    assert (tiny_base_model / "base.json").stat().st_mtime_ns == stamp
    # a different training seed is a different model, so a different folder
    assert base_dir(tiny_base_config(tiny_world, "pretrain.seed=5")) != tiny_base_model


# -- evaluator --------------------------------------------------------------------------------
def test_heldout_combinations_never_train():
    from omnidiff.base.evaluator_train import all_combinations, split_combinations

    train, held = split_combinations(0.15, seed=0)
    key = lambda c: tuple(sorted(c.items()))  # noqa: E731
    assert not {key(c) for c in train} & {key(c) for c in held}
    assert len(train) + len(held) == len(all_combinations()) == 5 * 8 * 5 * 2 * 3
    assert len(held) == 180


def test_tiny_evaluator_reads_attributes_above_chance(tiny_evaluator):
    from omnidiff.models.evaluator import load_evaluator
    from omnidiff.world import PROMPT_ATTRIBUTES

    evaluator = load_evaluator(tiny_evaluator, require_fit=False)
    assert set(evaluator.accuracy) == set(PROMPT_ATTRIBUTES)
    for attr, acc in evaluator.accuracy.items():
        chance = 1 / len(evaluator.labels[attr])
        assert acc > chance + 0.25, (attr, acc, chance)
    assert evaluator.features(np.zeros((3, 16, 16, 3), np.uint8)).shape == (3, evaluator.model.feature_dim)


def test_an_unfit_evaluator_is_refused(tmp_path):
    from omnidiff.models.evaluator import AttributeClassifier, EvaluatorUnfitError, load_evaluator, save_evaluator

    model = AttributeClassifier({"shape": ["circle", "square"], "colour": ["red", "blue", "green"]}, 16, 4, 8)
    save_evaluator(model, {"shape": 0.5, "colour": 0.99}, tmp_path / "unfit")
    with pytest.raises(EvaluatorUnfitError, match="shape"):
        load_evaluator(tmp_path / "unfit")
    assert load_evaluator(tmp_path / "unfit", require_fit=False).fit is False
    save_evaluator(model, {"shape": 0.96, "colour": 0.99}, tmp_path / "fit")
    evaluator = load_evaluator(tmp_path / "fit")
    assert evaluator.fit
    predicted = evaluator.predict(np.zeros((2, 16, 16, 3), np.uint8))
    assert set(predicted) == {"shape", "colour"} and len(predicted["colour"]) == 2
    with pytest.raises(ValueError, match="resolution 16"):
        evaluator.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="not an evaluator folder"):
        load_evaluator(tmp_path)


# -- the command ------------------------------------------------------------------------------
def test_cli_names_a_bad_override():
    from omnidiff.base.cli import main

    assert main(["pretrain", "--config", str(BASE_TEST_CONFIG), "pretrain.steps=0"]) == 2


def test_cli_score_writes_the_report(tiny_world, tiny_base_model, tiny_evaluator, tmp_path):
    import pandas as pd

    from omnidiff.base.cli import main

    out = tmp_path / "score"
    rc = main(
        [
            "score",
            "--config",
            str(BASE_TEST_CONFIG),
            f"world_dir={tiny_world}",
            f"score.out_dir={out}",
            "score.langs=[en, zh]",
            "score.max_per_group=2",
            "score.images_per_prompt=2",
            "sample.steps=2",
        ]
    )
    assert rc == 0
    report = json.loads((out / "score.json").read_text())
    assert report["model"] == str(tiny_base_model) and report["evaluator_fit"] is False
    assert report["images"] == 2 * 2 * 2 * 2  # langs x length buckets x prompts x images each
    assert np.isfinite(report["frechet_distance"])
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["lang"]) == {"en", "zh"} and set(summary["length"]) == {"<=77", ">77"}
    assert sorted(p.name for p in out.glob("grid_*.png")) == ["grid_en.png", "grid_zh.png"]
    # scoring refuses an unfit evaluator unless the config says otherwise
    assert (
        main(
            [
                "score",
                "--config",
                str(BASE_TEST_CONFIG),
                f"world_dir={tiny_world}",
                "score.require_fit_evaluator=true",
                f"score.out_dir={tmp_path / 'refused'}",
            ]
        )
        == 1
    )


@pytest.mark.e2e
def test_pretrain_logs_to_mlflow(stack, tiny_world, tmp_path, monkeypatch):
    import mlflow

    from omnidiff.base.pretrain import pretrain

    monkeypatch.setenv("OMNIDIFF_MODELS", str(tmp_path / "models"))  # a fresh cache: really trains
    folder = pretrain(tiny_base_config(tiny_world, "track=true", "pretrain.steps=4"))
    run_id = json.loads((folder / "base.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["stage"] == "base-pretrain" and run.info.status == "FINISHED"
    assert run.data.params["pretrain.steps"] == "4"
    assert len(client.get_metric_history(run_id, "loss")) == 4
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "pretrain_loss.png", "samples_en.png"} <= artifacts
    assert Path(folder).is_relative_to(tmp_path)
