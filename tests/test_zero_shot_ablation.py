"""benchmarks/zero_shot_ablation.py's variants: what a variant does not name stays the shipped config's.

    .venv/bin/pytest tests/test_zero_shot_ablation.py -x -q

A custom variant (``NAME:key=value``) once also set ``llm.layer: -1``, the default before session 12, so
``latin:align.langs=[en,es,de,fr]`` silently read the last layer while the default had moved to layer 9.
"""

from __future__ import annotations

import argparse

import pytest

from benchmarks.zero_shot_ablation import Ablation, parse_variant


def ablation(tmp_path) -> Ablation:
    return Ablation(argparse.Namespace(
        work=str(tmp_path), snapshot=str(tmp_path / "snapshot"), base_model=str(tmp_path / "base"), world_dir=str(tmp_path),
        evaluator_dir=str(tmp_path), reuse_cache=None, steps=40, seed=0, launcher="ray", langs=["en", "ko"],
        max_per_group=0, seeds_per_prompt=2, embed_set=[], train_set=[], eval_set=[]))


def test_a_custom_variant_keeps_the_shipped_layer_in_embed_and_train(tmp_path):
    name, overrides = parse_variant("latin:align.langs=[en,es,de,fr]")
    assert (name, overrides) == ("latin", {"align.langs": ["en", "es", "de", "fr"]})
    run = ablation(tmp_path)
    train, embed = run.train_config(name, overrides), run.embed_config(overrides)
    shipped = ablation(tmp_path).train_config("mid9", {})
    assert train.llm.layer == embed.llm.layer == shipped.llm.layer
    assert train.align.langs == ("en", "es", "de", "fr") and shipped.align.langs == ()


@pytest.mark.parametrize(("spec", "layer"), [("last", -1), ("mid9", 9), ("low:llm.layer=6", 6),
                                             ("pair:llm.layer=[6, 9]", (6, 9))])
def test_a_variant_that_names_the_layer_sets_it_in_embed_and_train(tmp_path, spec, layer):
    name, overrides = parse_variant(spec)
    run = ablation(tmp_path)
    assert run.train_config(name, overrides).llm.layer == run.embed_config(overrides).llm.layer == layer


def test_a_malformed_variant_is_refused():
    with pytest.raises(SystemExit, match="not key=value"):
        parse_variant("x:llm.layer")
    with pytest.raises(SystemExit, match="not one of"):
        parse_variant("nosuch")
