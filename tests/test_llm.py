"""The LLM text encoder on the tiny random Gemma 3 (fast) and on the real Gemma 3 270M (``slow``).

.venv/bin/pytest tests/test_llm.py -x -q              # fast
.venv/bin/pytest tests/test_llm.py -x -q -m slow      # real weights (converted once, cached)
"""

from __future__ import annotations

import json

import pytest
import torch

from omnidiff.models.llm import LLMTextEncoder, load_tokenizer
from omnidiff.models.llm_folders import build_tiny_llm, main, read_manifest, weights_digest

TEXTS = ["a red circle on the left", "左边有一个红色的圆", "", "un carré bleu en haut à droite, très petit"]


@pytest.fixture(scope="module")
def encoder(tiny_llm):
    return LLMTextEncoder(tiny_llm)


def test_tiny_llm_is_a_gemma3_with_byte_tokenizer(tiny_llm):
    config = json.loads((tiny_llm / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    manifest = read_manifest(tiny_llm)
    assert manifest["weights_digest"] == weights_digest(tiny_llm)


def test_tiny_llm_build_is_deterministic_per_seed(tmp_path, tiny_llm):
    same = build_tiny_llm(tmp_path / "a", seed=0)
    other = build_tiny_llm(tmp_path / "b", seed=1)
    assert read_manifest(same)["weights_digest"] == read_manifest(tiny_llm)["weights_digest"]
    assert read_manifest(other)["weights_digest"] != read_manifest(same)["weights_digest"]


def test_tokenizer_is_loaded_once_per_folder_version(tmp_path, tiny_llm):
    import shutil

    copy = shutil.copytree(tiny_llm, tmp_path / "llm")
    first = load_tokenizer(copy)
    assert load_tokenizer(copy) is first and first.padding_side == "right"
    assert LLMTextEncoder(copy).tokenizer is first  # the encoder shares the driver's copy
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")  # an edited tokenizer folder is read again
    assert load_tokenizer(copy) is not first


def test_encode_shapes_and_mask(encoder):
    states, mask = encoder.encode(TEXTS)
    lengths = encoder.token_lengths(TEXTS)
    assert states.dtype == torch.float32 and mask.dtype == torch.bool
    assert states.shape == (len(TEXTS), max(lengths), 64) and mask.shape == (len(TEXTS), max(lengths))
    assert mask.sum(1).tolist() == lengths
    # byte-level: the Chinese caption gives one token per UTF-8 byte (+ EOS), never <unk>
    assert lengths[1] == len(TEXTS[1].encode()) + 1
    assert lengths[2] == 1, "the empty prompt (unconditional) must still give one token"
    assert torch.isfinite(states).all()
    assert (states[~mask] == 0).all(), "padded positions are zero"
    assert (states[mask].abs().sum(-1) > 0).all()


def test_states_do_not_depend_on_batch_mates(encoder):
    batch, mask = encoder.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        alone, alone_mask = encoder.encode([text])
        n = int(alone_mask.sum())
        torch.testing.assert_close(alone[0, :n], batch[i, :n], rtol=1e-4, atol=1e-4)


def test_max_length_truncates(tiny_llm):
    enc = LLMTextEncoder(tiny_llm, max_length=8)
    states, mask = enc.encode(["x" * 100, "ab"])
    assert states.shape[1] == 8 and enc.token_lengths(["x" * 100, "ab"]) == [8, 3]


def test_layer_selects_hidden_states_and_changes_fingerprint(tiny_llm, encoder):
    first = LLMTextEncoder(tiny_llm, layer=1)
    last_explicit = LLMTextEncoder(tiny_llm, layer=2)
    assert first.fingerprint != encoder.fingerprint
    assert last_explicit.fingerprint == encoder.fingerprint, "-1 and num_hidden_layers are the same layer"
    a, _ = first.encode(TEXTS[:1])
    b, _ = encoder.encode(TEXTS[:1])
    assert not torch.allclose(a, b)
    inputs = encoder.fingerprint_inputs()
    assert inputs["template"] == "raw" and inputs["layer"] == 2 and len(encoder.fingerprint) == 16
    assert LLMTextEncoder(tiny_llm, max_length=64).fingerprint != encoder.fingerprint


def test_bad_input_is_a_clear_error(tiny_llm, encoder, tmp_path):
    with pytest.raises(ValueError, match="layer=5"):
        LLMTextEncoder(tiny_llm, layer=5)
    with pytest.raises(TypeError, match="list of str"):
        encoder.encode("a bare string")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLMTextEncoder(tmp_path)


def test_cli_info(tiny_llm, tmp_path, capsys):
    assert main(["info", str(tiny_llm)]) == 0
    assert json.loads(capsys.readouterr().out)["hidden_size"] == 64
    assert main(["info", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_real_gemma_encodes_many_scripts(gemma_llm):
    manifest = read_manifest(gemma_llm)
    assert manifest["model_id"] == "gemma3-270m" and len(manifest["source"]["sha256"]) == 64
    enc = LLMTextEncoder(gemma_llm)
    assert enc.hidden_size == 640
    texts = ["a red circle on the left", "左边有一个红色的圆", "左側に赤い円があります", "دائرة حمراء على اليسار"]
    states, mask = enc.encode(texts)
    assert states.shape[-1] == 640 and torch.isfinite(states).all()
    unk = enc.tokenizer.unk_token_id
    for text, ids in zip(texts, enc.tokenize(texts), strict=True):
        assert unk not in ids, text
        # a real multilingual vocabulary: far fewer tokens than UTF-8 bytes
        assert len(ids) < len(text.encode()) / 2, (text, len(ids))
    # different captions give different sentence states
    pooled = torch.nn.functional.normalize((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    assert (pooled @ pooled.T).fill_diagonal_(0).max() < 0.999


def test_forward_rows_continues_cached_prefixes_exactly(encoder):
    texts = ["a red circle on the left", "a red circle at the top", "a red square", "blue"]
    ids = encoder.tokenize(texts)
    full, mask = encoder.encode(texts)
    # The first 12 tokens of texts[0] once, their keys/values kept; the other rows continue them.
    head, kept = encoder.forward_rows([ids[0][:12]], keep=[12])
    assert kept[0] is not None and kept[0][0][0].shape[-2] == 12
    torch.testing.assert_close(head[0], full[0, :12], rtol=1e-4, atol=1e-4)
    shared = [8, 10, 6]  # rows continue different lengths of the same prefix in one batch, plus one from scratch
    prefixes = [[(k[:, :n], v[:, :n]) for k, v in kept[0]] for n in shared] + [None]
    suffixes = [ids[i][n:] for i, n in enumerate(shared)] + [ids[3]]
    assert all(ids[i][:n] == ids[0][:n] for i, n in enumerate(shared))
    states, again = encoder.forward_rows(suffixes, prefixes, keep=[0, 5, 0, 0])
    for i, n in enumerate(shared + [0]):
        torch.testing.assert_close(states[i], full[i, n : int(mask[i].sum())], rtol=1e-4, atol=1e-4)
    assert again[0] is None and again[1][0][0].shape[-2] == 5  # keep counts the prefix too
    torch.testing.assert_close(again[1][0][0], kept[0][0][0][:, :5])


def test_forward_rows_refuses_what_the_sliding_window_cannot_hold(encoder):
    assert encoder.share_limit == 255  # the tiny Gemma's window is 512
    _, kept = encoder.forward_rows([[5] * 300], keep=[300])
    with pytest.raises(ValueError, match="share_limit=255"):
        encoder.forward_rows([[6] * 220], [kept[0]])
