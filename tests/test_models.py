"""Builders and shapes of the model building blocks: CLIP-style encoder + tokenizer, UNet, adapter.

.venv/bin/pytest tests/test_models.py -x -q
"""

from __future__ import annotations

import json

import pytest
import torch

from omnidiff.models.adapter import OmniAdapter
from omnidiff.models.clip_text import (
    WINDOW,
    ClipTextEncoder,
    build_clip_text_encoder,
    build_clip_tokenizer,
    load_clip_tokenizer,
)
from omnidiff.models.unet import build_unet

WORDS = "a an the red green blue yellow circle square triangle on left right top bottom of small big background".split()


@pytest.fixture(scope="module")
def clip():
    return build_clip_text_encoder(WORDS, hidden=32, layers=2, heads=4)


# -- CLIP-style tokenizer ---------------------------------------------------------------------
def test_clip_tokenizer_is_english_only(tmp_path):
    tok = build_clip_tokenizer(WORDS, tmp_path)
    ids = tok("A RED circle, left!").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "a", "red", "circle", ",", "left", "!", "<eos>"]
    zh = tok("左边有一个红色的圆").input_ids
    assert tok.convert_ids_to_tokens(zh) == ["<bos>", "<unk>", "<eos>"]
    assert tok("purple").input_ids[1] == tok.unk_token_id
    again = load_clip_tokenizer(tmp_path)
    assert again("a red circle").input_ids == tok("a red circle").input_ids


def test_clip_tokenizer_truncates_at_77(tmp_path):
    tok = build_clip_tokenizer(WORDS, tmp_path)
    ids = tok(" ".join(["red"] * 200), truncation=True).input_ids
    assert len(ids) == WINDOW and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_clip_windows(clip):
    long = " ".join(["red"] * 100) + " circle"  # 101 words: "circle" is word 101, past one window
    ids, mask = clip.tokenize(["a red circle", long, ""], max_windows=1)
    assert ids.shape == (3, WINDOW)
    assert mask.sum(1).tolist() == [5, WINDOW, 2]
    assert clip.tokenizer.convert_tokens_to_ids("circle") not in ids[1].tolist(), "hard truncation at 75 words"
    ids3, mask3 = clip.tokenize(["a red circle", long], max_windows=3)
    assert ids3.shape == (2, 3 * WINDOW)
    assert mask3[1].sum() == WINDOW + (101 - 75 + 2) and not mask3[1, 2 * WINDOW :].any()
    assert ids3[1, WINDOW] == clip.tokenizer.bos_token_id, "window 2 starts with its own <bos>"
    assert clip.tokenizer.convert_tokens_to_ids("circle") in ids3[1].tolist()
    assert clip.token_lengths(["a red circle", long], max_windows=3) == [5, WINDOW + 28]


def test_clip_encode_shapes_and_pooled(clip):
    states, mask, pooled = clip.encode(["a red circle", "blue square on the left"], max_windows=2)
    assert states.shape == (2, 2 * WINDOW, 32) and mask.shape == (2, 2 * WINDOW) and pooled.shape == (2, 32)
    assert (states[~mask] == 0).all()
    eos = mask[:, :WINDOW].sum(1) - 1
    torch.testing.assert_close(pooled, states[torch.arange(2), eos])
    one, _, _ = clip.encode(["a red circle"], max_windows=1)
    torch.testing.assert_close(one[0], states[0, :WINDOW])


def test_clip_save_load_roundtrip(clip, tmp_path):
    clip.save_pretrained(tmp_path / "te", tmp_path / "tok")
    again = ClipTextEncoder.from_pretrained(tmp_path / "te", tmp_path / "tok")
    a = clip.encode(["a red circle"])[0]
    b = again.encode(["a red circle"])[0]
    torch.testing.assert_close(a, b)
    assert again.fingerprint() == clip.fingerprint() and again.fingerprint(3) != clip.fingerprint(1)
    assert json.loads((tmp_path / "te" / "config.json").read_text())["max_position_embeddings"] == WINDOW


def test_clip_bad_input(clip):
    with pytest.raises(TypeError, match="list of str"):
        clip.encode("a red circle")
    with pytest.raises(ValueError, match="max_windows=0"):
        clip.encode(["a"], max_windows=0)


# -- UNet ---------------------------------------------------------------------------------------
def test_unet_builder_shapes_and_size():
    unet = build_unet(16, 3, 3, (32, 64, 64), cross_attention_dim=32, layers_per_block=1, attention_head_dim=8)
    n_params = sum(p.numel() for p in unet.parameters())
    assert 1.0e6 < n_params < 2.5e6, n_params
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    x = torch.randn(2, 3, 16, 16)
    out = unet(x, torch.tensor([1, 900]), encoder_hidden_states=torch.randn(2, 7, 32)).sample
    assert out.shape == x.shape


def test_unet_pooled_conditioning_is_used():
    unet = build_unet(16, 3, 3, (32, 64), 32, 1, 8, pooled_dim=24).eval()
    assert unet.config.class_embed_type == "projection"
    x, ctx = torch.randn(1, 3, 16, 16), torch.randn(1, 5, 32)
    a = unet(x, 10, encoder_hidden_states=ctx, class_labels=torch.zeros(1, 24)).sample
    b = unet(x, 10, encoder_hidden_states=ctx, class_labels=torch.ones(1, 24)).sample
    assert not torch.allclose(a, b)


def test_unet_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        build_unet(10, 3, 3, (32, 64, 64), 32)
    with pytest.raises(ValueError, match="attention_head_dim"):
        build_unet(16, 3, 3, (30, 64), 32, attention_head_dim=8)


# -- adapter ------------------------------------------------------------------------------------
def test_adapter_shapes():
    adapter = OmniAdapter(llm_dim=48, width=32, out_dim=24, num_queries=11, encoder_layers=1, decoder_layers=2, heads=4,
                          input_norm=False, length_head=False, pooled_query=False)
    tokens, pooled = adapter(torch.randn(3, 9, 48), torch.ones(3, 9, dtype=torch.bool))
    assert tokens.shape == (3, 11, 24) and pooled.shape == (3, 24)
    tokens, _ = adapter(torch.randn(2, 40, 48), torch.ones(2, 40, dtype=torch.bool))
    assert tokens.shape == (2, 11, 24), "fixed number of outputs whatever the prompt length"


@pytest.mark.parametrize("train_mode", [False, True])
def test_adapter_masks_padding(train_mode):
    torch.manual_seed(0)
    adapter = OmniAdapter(16, 32, 8, 5, encoder_layers=2, decoder_layers=2, heads=4,
                          input_norm=False, length_head=False, pooled_query=False).train(train_mode)
    states = torch.randn(3, 12, 16)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 9:] = False
    changed = states.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 50
    a_tok, a_pool = adapter(states, mask)
    b_tok, b_pool = adapter(changed, mask)
    torch.testing.assert_close(a_tok, b_tok)
    torch.testing.assert_close(a_pool, b_pool)
    # and the same caption without the padding columns gives the same output
    short_tok, _ = adapter(states[:1, :4], mask[:1, :4])
    torch.testing.assert_close(short_tok, a_tok[:1], rtol=1e-5, atol=1e-5)
    # real tokens do matter
    real_changed = states.clone()
    real_changed[0, 0] += 1.0
    assert not torch.allclose(adapter(real_changed, mask)[0][0], a_tok[0])


@pytest.mark.parametrize("encoder_layers", [0, 2])
def test_adapter_training_path_matches_stock_modules(encoder_layers):
    """Training runs a cheaper body (real-token projection and feed-forward, the first decoder self-attention
    once per batch); its outputs and every gradient match torch's modules run as they are."""
    torch.manual_seed(0)
    adapter = OmniAdapter(16, 32, 8, 7, encoder_layers=encoder_layers, decoder_layers=2, heads=4,
                          input_norm=True, length_head=True, pooled_query=True).train()
    states = torch.randn(4, 10, 16)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 7:] = False
    x = (states - adapter.input_mean) / adapter.input_scale

    def grads(body):
        adapter.zero_grad()
        h = body(x, mask)
        (h[:, :-1].sin().sum() + h[:, -1].pow(2).sum()).backward()
        return h.detach(), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}

    fast, fast_grads = grads(adapter._training_body)
    stock, stock_grads = grads(adapter._stock_body)
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == stock_grads.keys() and "queries" in fast_grads
    for name, stock_grad in stock_grads.items():  # float rounding, relative to each gradient's largest entry
        scale = stock_grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(fast_grads[name] / scale, stock_grad / scale, rtol=1e-4, atol=1e-5, msg=name)
    # forward_all takes the training body in train mode, the stock modules in eval mode: the same outputs
    train_out = adapter.forward_all(states, mask)
    eval_out = adapter.eval().forward_all(states, mask)
    for a, b in zip(train_out, eval_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_adapter_training_path_with_dropout_draws_noise_per_row():
    """With dropout the first decoder layer is not shared: identical captions get different noise."""
    torch.manual_seed(0)
    adapter = OmniAdapter(16, 32, 8, 5, 1, 1, 4, 0.5, input_norm=False, length_head=False, pooled_query=False).train()
    states = torch.randn(1, 6, 16).expand(3, -1, -1)
    tokens, _ = adapter(states, torch.ones(3, 6, dtype=torch.bool))
    assert not torch.allclose(tokens[0], tokens[1])


def test_adapter_save_load(tmp_path):
    adapter = OmniAdapter(16, 32, 8, 5, 1, 1, 4, input_norm=False, length_head=False, pooled_query=False).eval()
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again = OmniAdapter.from_pretrained(tmp_path)
    x, m = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(adapter(x, m)[0], again(x, m)[0])


def test_adapter_input_norm_standardises_each_llm_dimension():
    """With input_norm, an affine change of each input dimension is undone by the matching statistics:
    massive dimensions (Gemma's |x| ~55 where the median is ~2) weigh no more than any other."""
    torch.manual_seed(0)
    a = OmniAdapter(16, 32, 8, 5, 1, 1, 4, input_norm=True, length_head=False, pooled_query=False).eval()
    x, m = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    plain = a(x, m)[0]
    scale, shift = torch.rand(16) * 50 + 0.5, torch.randn(16) * 20
    a.set_input_stats(shift, scale)
    torch.testing.assert_close(a(x * scale + shift, m)[0], plain, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shapes"):
        a.set_input_stats(torch.zeros(15), torch.ones(15))
    with pytest.raises(ValueError, match="NaN"):
        a.set_input_stats(torch.full((16,), float("nan")), torch.ones(16))
    with pytest.raises(ValueError, match="input_norm=False"):
        OmniAdapter(16, 32, 8, 5, 1, 1, 4, input_norm=False, length_head=False, pooled_query=False).set_input_stats(torch.zeros(16), torch.ones(16))


def test_adapter_pooled_query_and_length_head_shapes(tmp_path):
    torch.manual_seed(0)
    a = OmniAdapter(16, 32, 8, 5, 1, 1, 4, input_norm=True, length_head=True, pooled_query=True).eval()
    a.set_input_stats(torch.randn(16), torch.rand(16) + 0.5)
    x, m = torch.randn(3, 6, 16), torch.ones(3, 6, dtype=torch.bool)
    tokens, pooled, log_count = a.forward_all(x, m)
    assert tokens.shape == (3, 5, 8) and pooled.shape == (3, 8) and log_count.shape == (3,)
    assert a.queries.shape == (6, 32), "one extra query makes the pooled embedding"
    assert not torch.allclose(pooled, a.pooled_mlp(tokens.mean(1)))
    _, _, mask = a.condition(x, m)
    n = log_count.exp().round().clamp(1, 5)
    assert torch.equal(mask.sum(1), n.long()) and torch.equal(mask, mask.cummin(1).values), "a prefix of n queries"
    # flags and input statistics survive a save/load
    a.save_pretrained(tmp_path)
    again = OmniAdapter.from_pretrained(tmp_path)
    assert again.shape == a.shape
    torch.testing.assert_close(again.input_scale, a.input_scale)
    torch.testing.assert_close(again.condition(x, m)[0], tokens)


def test_adapter_folder_without_the_new_options_loads_as_before(tmp_path):
    """Exports made before input_norm / length_head / pooled_query existed keep their behaviour."""
    a = OmniAdapter(16, 32, 8, 5, 1, 1, 4, input_norm=False, length_head=False, pooled_query=False).eval()
    a.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("input_norm", "length_head", "pooled_query"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    again = OmniAdapter.from_pretrained(tmp_path)
    x, m = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    _, _, mask = again.condition(x, m)
    assert mask.all(), "no length head: every query is read"
    torch.testing.assert_close(again(x, m)[1], a(x, m)[1])


def test_adapter_folder_with_position_embeddings_is_refused(tmp_path):
    """max_positions was removed (issue 14): such a folder cannot load silently without its embeddings."""
    OmniAdapter(16, 32, 8, 5, 1, 1, 4, input_norm=False, length_head=False, pooled_query=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_positions": 512}))
    with pytest.raises(ValueError, match="max_positions"):
        OmniAdapter.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_positions": 0}))
    OmniAdapter.from_pretrained(tmp_path)  # 0 = it never had any: loads


def test_adapter_bad_input():
    adapter = OmniAdapter(16, 32, 8, 5, 1, 1, 4, input_norm=False, length_head=False, pooled_query=False)
    with pytest.raises(ValueError, match="expected"):
        adapter(torch.randn(1, 4, 17), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no real token"):
        adapter(torch.randn(1, 4, 16), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        OmniAdapter(16, 30, 8, 5, 1, 1, 4, input_norm=False, length_head=False, pooled_query=False)
