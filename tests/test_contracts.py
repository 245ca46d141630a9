"""Unit tests of the core's contracts (omnidiff/contracts/): keys, the English side, encoder specs, file helpers.

    .venv/bin/pytest tests/test_contracts.py -x -q
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from omnidiff.contracts import io as cio
from omnidiff.contracts.encoders import (
    clip_inputs,
    clip_spec,
    describe_clip,
    fingerprint,
    pixels_inputs,
    pixels_spec,
    vae_scale_factor,
)
from omnidiff.contracts.keys import EMPTY_PROMPT, cache_key, english_side, text_key


def test_cache_key_normalises_then_keys():
    assert cache_key("  a\tred  circle ") == ("a red circle", text_key("a red circle"))
    assert cache_key(EMPTY_PROMPT) == ("", text_key(""))


def test_english_side_of_pairs_and_parallel_rows():
    assert english_side("un cercle", "fr", "a circle") == "a circle"
    assert english_side("a circle", "en", None) == "a circle"
    assert english_side("a circle", "en", math.nan) == "a circle"
    assert english_side("un cercle", "fr", None) is None
    assert english_side("un cercle", "fr", "  ") is None
    # A parallel row has only its translation, even when its own text is English.
    assert english_side("a circle", "en", None, parallel=True) is None
    assert english_side("un cercle", "fr", "a circle", parallel=True) == "a circle"


def test_clip_spec_matches_the_loaded_encoder_without_loading_it(tmp_path, monkeypatch):
    import transformers

    from omnidiff.models.clip_text import ClipTextEncoder, build_clip_text_encoder
    from omnidiff.world import english_vocabulary

    encoder = build_clip_text_encoder(english_vocabulary(), hidden=32, layers=1, heads=2, seed=0)
    encoder.save_pretrained(tmp_path / "text_encoder", tokenizer_folder=tmp_path / "tokenizer")
    loaded = ClipTextEncoder.from_pretrained(tmp_path / "text_encoder", tokenizer_folder=tmp_path / "tokenizer")

    def no_model(*args, **kwargs):
        raise AssertionError("naming a CLIP cache must not build the model")

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", no_model)
    monkeypatch.setattr(ClipTextEncoder, "from_pretrained", no_model)
    for windows in (1, 3):
        inputs, hidden = describe_clip(tmp_path / "text_encoder", tmp_path / "tokenizer", windows)
        assert inputs == loaded.fingerprint_inputs(windows)
        assert hidden == loaded.hidden_size == 32
        spec = clip_spec(tmp_path / "text_encoder", tmp_path / "tokenizer", windows)
        assert spec.inputs == clip_inputs(loaded.fingerprint_inputs(windows))
        assert spec.value_shape == (32,)
        assert spec.fingerprint == fingerprint(spec.inputs)


def test_pixels_spec_with_and_without_a_vae(tmp_path):
    spec = pixels_spec(16)
    assert spec.inputs == pixels_inputs(16) and spec.value_shape == (3, 16, 16)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"block_out_channels": [8, 16, 32], "latent_channels": 4,
                                                 "scaling_factor": 0.5}))
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    assert vae_scale_factor(json.loads((vae / "config.json").read_text())) == 4
    spec = pixels_spec(32, vae)
    assert spec.value_shape == (4, 8, 8)
    assert spec.inputs["vae"]["scaling_factor"] == 0.5
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling 4"):
        pixels_spec(18, vae)


def test_sha256_and_atomic_write(tmp_path):
    path = tmp_path / "x.json"
    cio.atomic_write(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    cio.atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert cio.sha256_file(path) == cio.sha256_bytes(b"\x00\x01") == hashlib.sha256(b"\x00\x01").hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temp file left behind


def test_file_lock_is_exclusive(tmp_path):
    import filelock

    first = cio.file_lock(tmp_path / ".lock", timeout=0)
    first.acquire()
    try:
        with pytest.raises(filelock.Timeout):
            cio.file_lock(tmp_path / ".lock", timeout=0).acquire()
    finally:
        first.release()
    with cio.file_lock(tmp_path / ".lock", timeout=0):
        pass
