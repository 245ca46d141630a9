"""benchmarks/zero_shot_ablation.py's variants: what a variant does not name stays the shipped config's.

    .venv/bin/pytest tests/test_zero_shot_ablation.py -x -q

A custom variant (``NAME:key=value``) once also set ``llm.layer: -1``, the default before session 12, so
``latin:align.langs=[en,es,de,fr]`` silently read the last layer while the default had moved to layer 9. And
``--seeds-per-prompt k`` once repeated each prompt row after the evaluation had seeded it, so a prompt's k
"images" were one image k times; the evaluation config now asks for the k images itself.
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


def test_each_image_of_a_prompt_gets_its_own_seed_and_a_spec_the_same_noise_in_every_language(tmp_path, tiny_world):
    from train.evaluate import eval_prompts, select_prompts, with_image_seeds

    run = ablation(tmp_path)
    run.args.world_dir = str(tiny_world)
    cfg = run.eval_config("mid9")
    assert cfg.images_per_prompt == run.args.seeds_per_prompt == 2
    # what train.evaluate.resolve_inputs builds from this config (its evaluator aside)
    prompts = select_prompts(eval_prompts(tiny_world, cfg.eval_specs), cfg.max_per_group, cfg.langs, cfg.seed)
    rows = with_image_seeds(prompts, cfg.images_per_prompt, cfg.seed)
    assert set(rows["lang"]) == {"en", "ko"}
    per_prompt = rows.groupby("prompt")["seed"].agg(["nunique", "size"])
    assert (per_prompt["nunique"] == 2).all() and (per_prompt["size"] == 2).all()
    per_image = rows.groupby(["spec", "sample"])["seed"].nunique()
    assert (per_image == 1).all()  # the k-th image of a spec: the same seed in en and ko


def test_a_malformed_variant_is_refused():
    with pytest.raises(SystemExit, match="not key=value"):
        parse_variant("x:llm.layer")
    with pytest.raises(SystemExit, match="not one of"):
        parse_variant("nosuch")
