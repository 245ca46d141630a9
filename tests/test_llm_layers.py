"""Several LLM layers feeding the adapter (issue 18 item 3): ``llm.layer: [i, j, ...]`` concatenates those
layers' hidden states along the features, names its own cache and travels with an exported pipeline.

.venv/bin/pytest tests/test_llm_layers.py -x -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnidiff.config import ConfigError, load_config
from omnidiff.contracts.encoders import describe_llm, llm_fingerprint, llm_spec
from omnidiff.models.adapter import OmniAdapter
from omnidiff.models.llm import LLMTextEncoder
from omnidiff.models.unet import build_unet
from omnidiff.pipeline import OmniDiffusionPipeline

TEXTS = ["a red circle on the left", "左边有一个红色的圆", "", "ein blaues Quadrat oben rechts"]


def _transformers_states(path, text: str, indices) -> torch.Tensor:
    """transformers' own ``hidden_states`` of ``text`` at ``indices``, each earlier layer than the last
    through the model's own final norm (``model.norm``), concatenated: (T, k x D)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
        last = model.config.num_hidden_layers
        torch.testing.assert_close(out.hidden_states[last], out.last_hidden_state)  # already normed
        return torch.cat([out.hidden_states[i][0] if i == last else model.norm(out.hidden_states[i][0])
                          for i in indices], dim=-1)


def test_states_are_the_concatenation_of_transformers_hidden_states(tiny_llm):
    enc = LLMTextEncoder(tiny_llm, layer=[0, 1, 2])  # the tiny Gemma has hidden_states 0..2
    assert enc.layers == (0, 1, 2) and enc.layer == [0, 1, 2] and enc.hidden_size == 3 * 64
    states, mask = enc.encode(TEXTS)  # (B, T, 192), (B, T)
    assert states.shape[-1] == 192
    for i, text in enumerate(TEXTS[:2]):
        want = _transformers_states(tiny_llm, text, [0, 1, 2])  # (T, 192)
        torch.testing.assert_close(states[i, mask[i]], want, rtol=1e-4, atol=1e-4)
    # each block is that single layer's encoding, in the order given
    for j, layer in enumerate((0, 1, 2)):
        alone, _ = LLMTextEncoder(tiny_llm, layer=layer).encode(TEXTS)
        torch.testing.assert_close(states[..., 64 * j : 64 * (j + 1)], alone, rtol=1e-5, atol=1e-5)
    assert (states[~mask] == 0).all()


def test_the_layer_set_names_the_cache_and_a_single_layer_keeps_its_old_name(tiny_llm):
    last = LLMTextEncoder(tiny_llm)
    pair = LLMTextEncoder(tiny_llm, layer=[1, 2])
    other_pair = LLMTextEncoder(tiny_llm, layer=[0, 2])
    assert len({last.fingerprint, pair.fingerprint, other_pair.fingerprint}) == 3
    assert LLMTextEncoder(tiny_llm, layer=[1, -1]).fingerprint == pair.fingerprint, "-1 is layer 2"
    # one layer, as an index or a one-element list, is the cache it always was (old caches stay valid)
    assert LLMTextEncoder(tiny_llm, layer=[2]).fingerprint == last.fingerprint
    assert "layer_combine" not in last.fingerprint_inputs() and last.fingerprint_inputs()["layer"] == 2
    assert "layer_norm" not in last.fingerprint_inputs()
    assert pair.fingerprint_inputs()["layer"] == [1, 2] and pair.fingerprint_inputs()["layer_norm"] == "final-norm"
    # an earlier layer alone goes through the final norm: a cache of its raw states has another name
    assert LLMTextEncoder(tiny_llm, layer=1).fingerprint_inputs()["layer_norm"] == "final-norm"
    # the no-weights description the embed driver and the train stage use agrees with the loaded encoder
    for enc in (last, pair, other_pair, LLMTextEncoder(tiny_llm, layer=1)):
        inputs, hidden = describe_llm(tiny_llm, enc.layer)
        assert inputs == enc.fingerprint_inputs() and hidden == enc.hidden_size
        assert llm_spec(tiny_llm, enc.layer).fingerprint == llm_fingerprint(enc.fingerprint_inputs())
    assert llm_spec(tiny_llm, (1, 2)).value_shape == (128,)


def test_prefix_sharing_gives_the_same_concatenated_states(tiny_llm):
    enc = LLMTextEncoder(tiny_llm, layer=[1, 2])
    ids = enc.tokenize(["a red circle on the left", "a red circle on the right"])
    full, _ = enc.forward_rows([ids[1]])
    p = 6
    _, kept = enc.forward_rows([ids[0]], keep=[p])
    cont, _ = enc.forward_rows([ids[1][p:]], prefixes=[kept[0]])
    torch.testing.assert_close(cont[0], full[0][p:], rtol=1e-4, atol=1e-4)


def test_bad_layer_sets_are_clear_errors(tiny_llm):
    for bad, why in (([2, 1], "increasing"), ([1, 1], "increasing"), ([], "non-empty"), ([1, 5], "0..2"),
                     (["1"], "index")):
        with pytest.raises(ValueError, match=why):
            LLMTextEncoder(tiny_llm, layer=bad)
        with pytest.raises(ValueError, match="llm.layer="):
            describe_llm(tiny_llm, bad)


def test_config_takes_an_index_or_a_list(tmp_path):
    from embed_cache.config import EmbedConfig
    from train.config import TrainConfig

    assert load_config(EmbedConfig, "configs/embed.yaml", ["llm.layer=[6, 12, 18]"]).llm.layer == (6, 12, 18)
    assert load_config(TrainConfig, "configs/train_stage1.yaml", ["llm.layer=[6,12,18]"]).llm.layer == (6, 12, 18)
    assert load_config(EmbedConfig, "configs/embed.yaml", ["llm.layer=9"]).llm.layer == 9
    with pytest.raises(ConfigError, match=r"llm.layer=\[\]: an empty list"):
        load_config(EmbedConfig, "configs/embed.yaml", ["llm.layer=[]"])
    with pytest.raises(ConfigError, match=r"llm.layer=\[3, 3\]: a layer is listed twice"):
        load_config(EmbedConfig, "configs/embed.yaml", ["llm.layer=[3, 3]"])


def test_a_pipeline_saved_with_layers_reloads_with_them(tmp_path, tiny_llm):
    torch.manual_seed(0)
    llm = LLMTextEncoder(tiny_llm, layer=[1, 2])
    adapter = OmniAdapter(llm_dim=llm.hidden_size, width=32, out_dim=32, num_queries=8, encoder_layers=1,
                          decoder_layers=1, heads=4, input_norm=False, length_head=False, pooled_query=False)
    unet = build_unet(16, 3, 3, (16, 32), 32, 1, 8, 32)
    from diffusers import DDPMScheduler

    pipe = OmniDiffusionPipeline(unet, DDPMScheduler(num_train_timesteps=1000), "llm_adapter", adapter=adapter, llm=llm)
    folder = pipe.save_pretrained(tmp_path / "pipe")
    ref = json.loads((folder / "text_encoder" / "encoder.json").read_text())
    assert ref["layer"] == [1, 2] and ref["fingerprint"] == llm.fingerprint
    loaded = OmniDiffusionPipeline.from_pretrained(folder, llm_path=tiny_llm)
    assert loaded.llm.layers == (1, 2) and loaded.llm.hidden_size == 128
    assert loaded.llm is not llm and loaded.llm.fingerprint == llm.fingerprint
    a = pipe([TEXTS[0]], seed=3, num_inference_steps=2, output_type="np")
    b = loaded([TEXTS[0]], seed=3, num_inference_steps=2, output_type="np")
    assert (a == b).all()
    # an encoder with another layer set cannot be paired with this adapter
    with pytest.raises(ValueError, match="layer"):
        OmniDiffusionPipeline.from_pretrained(folder, llm=LLMTextEncoder(tiny_llm, layer=[0, 2]))


def _embed_llm(snapshot, llm, cache_root, layer) -> None:
    """The embed stage's LLM cache of ``snapshot`` with ``layer``, in this process (as fixtures_train does)."""
    from embed_cache.config import EmbedConfig, LLMSection
    from embed_cache.encoders.llm import LLMShardEncoder
    from embed_cache.inputs import gather_inputs
    from embed_cache.plan import plan_kind
    from embed_cache.writer import open_writer
    from omnidiff.contracts.cache import cache_dir

    cfg = EmbedConfig(snapshots=(str(snapshot),), kinds=("llm",), cache_root=cache_root,
                      llm=LLMSection(path=llm, layer=layer), track=False)
    plan = plan_kind("llm", cfg)
    work = gather_inputs([snapshot], cfg).work("llm")
    keys = sorted(work)
    encoder = LLMShardEncoder(**plan.encoder, max_batch_size=64)
    assert encoder.model.layers == (1, 2) and plan.value_shape == (128,)
    with open_writer(cache_dir("llm", plan.fingerprint, cache_root), plan.inputs) as writer:
        writer.set_value_shape(plan.value_shape)
        writer.write(encoder.table(keys, encoder.compute([work[k] for k in keys])), unit=0)


def test_stage1_on_a_layer_set_and_english_alone_exports_a_pipeline_with_those_layers(
        train_snapshot, train_caches, tiny_llm, train_overrides):
    """embed (layers [1, 2]) -> stage 1 on English alone (DeepSpeed, local launcher) -> export -> reload."""
    from train.config import TrainConfig
    from train.inputs import CacheMismatchError, resolve_inputs
    from train.launch import run

    def config(name: str, **extra) -> TrainConfig:
        return load_config(TrainConfig, "configs/train_test_stage1.yaml",
                           train_overrides(name, **{"samples.per_group": 0, **extra}))

    with pytest.raises(CacheMismatchError):  # no cache of this layer set yet: never another layer's states
        resolve_inputs(config("missing", **{"llm.layer": [1, 2]}))
    _embed_llm(train_snapshot, tiny_llm, train_caches, (1, 2))
    every = resolve_inputs(config("all", **{"llm.layer": [1, 2]}))
    assert every.llm_dim == 128 and every.llm_encoder_inputs["layer"] == [1, 2]
    assert {"en", "de", "zh"} <= set(every.examples["lang"])
    cfg = config("english", **{"llm.layer": [1, 2], "align.langs": ["en"], "max_steps": 4})
    english = resolve_inputs(cfg)
    assert set(english.examples["lang"]) <= {"en", ""} and (english.examples["lang"] == "en").sum() > 0
    assert (english.examples["lang"] == "en").sum() == (every.examples["lang"] == "en").sum()
    with pytest.raises(Exception, match=r"align.langs=\['xx'\]: no stage-1 examples"):
        resolve_inputs(config("none", **{"llm.layer": [1, 2], "align.langs": ["xx"]}))

    result = run(cfg)
    folder = result["export_dir"]
    ref = json.loads((Path(folder) / "text_encoder" / "encoder.json").read_text())
    assert ref["layer"] == [1, 2]
    pipe = OmniDiffusionPipeline.from_pretrained(folder, llm_path=tiny_llm)
    assert pipe.llm.layers == (1, 2) and pipe.adapter.shape.llm_dim == 128
    images = pipe(["a red circle", "ein rotes Quadrat"], seed=0, num_inference_steps=2, output_type="np")
    assert images.shape[0] == 2


@pytest.mark.slow
def test_gemma_middle_layers_fit_the_fp16_cache(gemma_llm):
    """Gemma 3's raw middle-layer residual stream overflows fp16 at <bos> (the cache rejected every row
    as inf); through the final norm every value is finite in fp16, and the layers still differ."""
    enc = LLMTextEncoder(gemma_llm, layer=[6, 9, 12, 18])
    states, mask = enc.encode(TEXTS)  # (B, T, 4 x 640)
    assert states.shape[-1] == 4 * 640
    assert torch.isfinite(states[mask].half()).all()
    blocks = states[mask].reshape(-1, 4, 640)
    assert not torch.allclose(blocks[:, 1], blocks[:, 3], atol=1e-2)
    raw = enc.model(input_ids=torch.tensor([enc.tokenize(TEXTS[:1])[0]]), output_hidden_states=True).hidden_states[9]
    assert not torch.isfinite(raw.half()).all(), "the raw layer-9 stream no longer overflows fp16: revisit the norm"
