"""The encoder runs only the decoder layers it needs (issue 18 item 5): an earlier layer than the last
gives the states of the whole model, from a body cut after that layer.

.venv/bin/pytest tests/test_llm_truncate.py -x -q
"""

from __future__ import annotations

import pytest
import torch

from omnidiff.models import llm as llm_module
from omnidiff.models.llm import LLMTextEncoder

# Longer than the test models' sliding window (8 bytes), so sliding and full layers differ.
TEXTS = ["a red circle on the left of a blue square", "左边有一个红色的圆，右边有一个蓝色的方块", "",
         "ein blaues Quadrat oben rechts", "x"]


def _tiny_gemma(out, layers: int, seed: int = 0):
    """A random Gemma 3 text model with ``layers`` decoder layers, sliding and full ones mixed."""
    from transformers import ByT5Tokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = ByT5Tokenizer(extra_ids=0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=512, sliding_window=8, sliding_window_pattern=3,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    Gemma3ForCausalLM(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _whole_model_states(path, texts, indices) -> list[torch.Tensor]:
    """Per text, transformers' ``hidden_states`` of the whole (uncut) body at ``indices``, an earlier layer
    than the last through the final norm, concatenated: (T, k x D)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    last = model.config.num_hidden_layers
    assert len(model.layers) == last
    out = []
    for text in texts:
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            ids = torch.tensor([[tokenizer.eos_token_id]])
        with torch.inference_mode():
            h = model(input_ids=ids, output_hidden_states=True)
            out.append(torch.cat([h.hidden_states[i][0] if i == last else model.norm(h.hidden_states[i][0])
                                  for i in indices], dim=-1))
    return out


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemmas")
    return {n: _tiny_gemma(root / f"l{n}", n, seed=n) for n in (1, 4, 7)}


@pytest.mark.parametrize(("n", "layer"), [
    (4, 0), (4, 1), (4, 2), (4, 3), (4, 4), (4, [1, 3]), (4, [0, 4]),
    (7, 2), (7, 3), (7, 5), (7, 6), (7, [2, 4]), (7, [0, 3, 6]), (1, 0), (1, 1),
])
def test_a_cut_body_gives_the_whole_bodys_states(gemmas, n, layer, monkeypatch):
    enc = LLMTextEncoder(gemmas[n], layer=layer)
    deepest = max(enc.layers)
    assert enc.run_layers == max(deepest, 1) and len(enc.model.layers) == enc.run_layers
    assert enc.model.config.num_hidden_layers == enc.run_layers == len(enc.model.config.layer_types)
    assert enc.num_hidden_layers == n  # indices keep meaning the whole model's hidden_states
    states, mask = enc.encode(TEXTS)  # (B, T, k x D)
    # the encoder as it was before the cut (every body runs whole): the very same numbers, batching included
    monkeypatch.setattr(llm_module, "TRUNCATABLE_MODEL_TYPES", frozenset())
    whole = LLMTextEncoder(gemmas[n], layer=layer)
    assert whole.run_layers == n and len(whole.model.layers) == n
    whole_states, whole_mask = whole.encode(TEXTS)
    assert torch.equal(mask, whole_mask) and torch.equal(states, whole_states), "the cut body's states differ"
    # and what transformers' whole model gives, text by text (unbatched: float rounding differs slightly)
    for i, want in enumerate(_whole_model_states(gemmas[n], TEXTS, enc.layers)):
        torch.testing.assert_close(states[i, mask[i]], want, rtol=1e-5, atol=1e-5)


def test_cutting_keeps_the_fingerprint_and_frees_the_kv_cache_of_the_dropped_layers(gemmas):
    from omnidiff.contracts.encoders import describe_llm, llm_fingerprint, llm_spec

    whole = LLMTextEncoder(gemmas[7], layer=[2, 7])
    cut = LLMTextEncoder(gemmas[7], layer=2)
    assert whole.run_layers == 7 and cut.run_layers == 2
    assert cut.kv_bytes_per_token * 7 == whole.kv_bytes_per_token * 2
    # the fingerprint names the layer's states, which the cut does not change: the one the embed
    # driver computes without loading weights
    inputs, hidden = describe_llm(gemmas[7], 2)
    assert cut.fingerprint_inputs() == inputs and hidden == cut.hidden_size == 32
    assert llm_spec(gemmas[7], 2).fingerprint == llm_fingerprint(cut.fingerprint_inputs())


def test_the_cut_body_continues_cached_prefixes_exactly(gemmas):
    enc = LLMTextEncoder(gemmas[7], layer=[1, 4])
    assert enc.run_layers == 4 and enc.share_limit == 3  # window 8: a prefix + continuation of 6 at most
    ids = enc.tokenize(["abcdef", "abcxyz"])
    full, _ = enc.forward_rows([ids[1][:6]])
    _, kept = enc.forward_rows([ids[0][:3]], keep=[3])
    assert len(kept[0]) == 4  # one (keys, values) per layer that runs
    cont, _ = enc.forward_rows([ids[1][3:6]], prefixes=[kept[0]])
    torch.testing.assert_close(cont[0], full[0][3:], rtol=1e-5, atol=1e-5)
