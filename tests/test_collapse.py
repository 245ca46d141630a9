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
        add_target_stats(stats, plan, FASHION)
    assert {name: stats[name] for name in TARGET_METRICS} == pytest.approx(
        {"unknown_fraction": 2 / 6, "distinct_fraction": 1 / 10})
    assert "cannot tell the captions apart" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="omnidiff.embed"):
        add_target_stats(stats, plan, WORLD)
    assert stats["distinct_fraction"] == 1.0 and caplog.text == ""
