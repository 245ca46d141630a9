"""Targets that cannot teach anything are said so (issue 16 item 8).

    .venv/bin/pytest tests/test_collapse.py -x -q

Embed reports the share of unknown tokens and of distinct CLIP targets per caption set.
"""

from __future__ import annotations

from pathlib import Path

import pytest

WORLD_WORDS = ["a", "photo", "of", "red", "blue", "circle", "square", "on", "the", "left", "right"]
# Fashion-MNIST-like captions: the tiny world's word tokenizer knows only "a" and "of".
FASHION = [f"a grayscale photo of a {c}" for c in
           ["sneaker", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "bag", "boot", "top"]]
WORLD = ["a photo of a red circle", "a photo of a blue square", "a red square on the left", "a blue circle"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from omnidiff.models.clip_text import build_clip_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_clip_tokenizer(WORLD_WORDS, out)
    return out


def test_unknown_words_collapse_the_targets(tokenizer_dir):
    from embed_cache.encoders.clip import target_token_stats

    found = target_token_stats(FASHION, 1, tokenizer=str(tokenizer_dir))
    # "a <unk> photo of a <unk>": 2 of 6 tokens unknown, ten captions share one target.
    assert found["captions"] == 10
    assert found["unknown_fraction"] == pytest.approx(2 / 6)
    assert found["distinct_fraction"] == pytest.approx(1 / 10)


def test_known_words_keep_the_targets_apart(tokenizer_dir):
    from embed_cache.encoders.clip import target_token_stats

    found = target_token_stats(WORLD, 1, tokenizer=str(tokenizer_dir))
    assert found["unknown_fraction"] == 0.0
    assert found["distinct_fraction"] == 1.0


def test_target_stats_need_one_tokenizer():
    from embed_cache.encoders.clip import target_token_stats

    with pytest.raises(ValueError, match="give tokenizer"):
        target_token_stats(WORLD, 1)


def test_embed_report_carries_and_logs_the_target_stats(tokenizer_dir, caplog):
    from embed_cache.plan import KindPlan
    from embed_cache.report import TARGET_METRICS, add_target_stats

    plan = KindPlan("clip", {}, (8,), {"tokenizer": str(tokenizer_dir), "max_windows": 1}, lambda k, t: [])
    stats: dict = {}
    with caplog.at_level("WARNING", logger="omnidiff.embed"):
        add_target_stats(stats, plan, [FASHION])
    assert {name: stats[name] for name in TARGET_METRICS} == pytest.approx(
        {"unknown_fraction": 2 / 6, "distinct_fraction": 1 / 10})
    assert "cannot tell the captions apart" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="omnidiff.embed"):
        add_target_stats(stats, plan, [WORLD])
    assert stats["distinct_fraction"] == 1.0 and caplog.text == ""


def test_target_stats_are_the_same_over_several_parts(tokenizer_dir):
    """The driver counts part by part (its hash partitions): the shares are those of the whole caption set."""
    from embed_cache.plan import KindPlan
    from embed_cache.report import TARGET_METRICS, add_target_stats

    plan = KindPlan("clip", {}, (8,), {"tokenizer": str(tokenizer_dir), "max_windows": 1}, lambda k, t: [])
    whole: dict = {}
    add_target_stats(whole, plan, [FASHION + WORLD])
    split: dict = {}
    add_target_stats(split, plan, [FASHION[:4] + WORLD[:2], FASHION[4:], WORLD[2:]], partitions=3)
    assert {n: split[n] for n in TARGET_METRICS} == pytest.approx({n: whole[n] for n in TARGET_METRICS})
    assert whole["distinct_fraction"] == pytest.approx(5 / 14)  # the ten Fashion captions share one target
    with pytest.raises(TypeError, match="lists of texts"):
        add_target_stats({}, plan, FASHION)  # a bare list of captions: each would be read as a part


# ------------------------------------------------------------------------------- stage 1 refuses


def _clip_store(tmp_path, states):
    import numpy as np

    from embed_cache.writer import CacheWriter
    from omnidiff.contracts.cache import CacheStore, cache_dir, states_table
    from omnidiff.contracts.encoders import clip_inputs, fingerprint

    inputs = clip_inputs({"model_id": "clip-text", "weights_digest": "d", "template": "clip-windows-77x1"})
    keys = [f"k{i}" for i in range(len(states))]
    with CacheWriter(cache_dir("clip", fingerprint(inputs), tmp_path), inputs) as writer:
        writer.set_value_shape((8,))
        writer.write(states_table(keys, states, pooled=np.stack([s[-1] for s in states])), unit=0)
    return CacheStore(writer.path), keys


def test_stage1_refuses_collapsed_targets_and_allows_them_when_told(tmp_path, caplog):
    import numpy as np

    from train.inputs import TrainingError, check_targets

    rng = np.random.default_rng(0)
    one = rng.standard_normal((6, 8)).astype(np.float32)
    # Ten captions, seven of which share one target (float noise far below the rounding), three their own.
    states = [one + 1e-5 * rng.standard_normal(one.shape).astype(np.float32) for _ in range(7)]
    states += [rng.standard_normal((6, 8)).astype(np.float32) for _ in range(3)]
    store, keys = _clip_store(tmp_path, states)
    with pytest.raises(TrainingError, match=r"only 40% of 10 distinct English texts.*min_distinct_targets=0.5"):
        check_targets(store, keys + keys[:3], 0.5, allow=False)
    with caplog.at_level("WARNING", logger="omnidiff.train"):
        assert check_targets(store, keys, 0.5, allow=True) == pytest.approx(0.4)
    assert "allow_collapsed_targets" in caplog.text
    assert check_targets(store, keys, 0.0, allow=False) == 1.0  # the check turned off


def test_stage1_accepts_distinct_targets(tmp_path):
    import numpy as np

    from train.inputs import check_targets

    rng = np.random.default_rng(1)
    store, keys = _clip_store(tmp_path, [rng.standard_normal((n, 8)).astype(np.float32) for n in range(3, 13)])
    assert check_targets(store, keys, 0.5, allow=False) == 1.0


def test_align_section_has_the_threshold():
    from omnidiff.config import ConfigError
    from train.config import AlignSection

    assert AlignSection().min_distinct_targets == 0.5 and AlignSection().allow_collapsed_targets is False
    with pytest.raises(ConfigError, match="min_distinct_targets=1.5"):
        AlignSection(min_distinct_targets=1.5)


# ------------------------------------------------------------------------------- evaluate refuses


def _model_trained_on(tmp_path, name: str, captions: list[str]) -> Path:
    import json

    from tests.fixtures_embed import write_snapshot

    snap = write_snapshot(name, [{"caption": c, "caption_en": c} for c in captions], root=tmp_path / "snapshots")
    model = tmp_path / f"model-{name}"
    model.mkdir()
    (model / "lineage.json").write_text(json.dumps({"stage": 1, "snapshot": {"name": name, "path": str(snap)}}))
    return model


def test_evaluate_refuses_a_judge_of_another_world(tmp_path, capsys):
    import pandas as pd

    from train.evaluate import check_judge_applies

    world = tmp_path / "world"
    world.mkdir()
    # Case and spacing differ from the snapshot's normalised captions; they still count as the world's.
    pd.DataFrame({"caption_en": [c.upper() + "  " for c in WORLD] + ["a red circle on the right"]}).to_parquet(
        world / "pairs.parquet")
    fashion = _model_trained_on(tmp_path, "fashion", FASHION)
    with pytest.raises(ValueError, match=r"only 0% are captions of the judged world.*allow_other_world=true"):
        check_judge_applies(str(fashion), world)
    assert check_judge_applies(str(fashion), world, allow=True) == 0.0
    assert "allowed by allow_other_world" in capsys.readouterr().err
    own = _model_trained_on(tmp_path, "own", WORLD)
    assert check_judge_applies(str(own), world) == 1.0
    base = tmp_path / "base-folder"  # no lineage.json: nothing to check
    base.mkdir()
    assert check_judge_applies(str(base), world) is None
