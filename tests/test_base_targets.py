"""Stage-1 targets of a published base are exactly what its own diffusers pipeline feeds its UNet (issue 16).

    .venv/bin/pytest tests/test_base_targets.py -x -q

On the tiny SD 1.5 and SDXL folders of tests/fixtures_bases.py (published layout: vocab.json +
merges.txt tokenizers), the targets of ``BaseTextEncoder`` and of the cache that ``omnidiff embed``
writes are compared with ``StableDiffusionPipeline.encode_prompt`` / ``StableDiffusionXLPipeline.
encode_prompt`` of diffusers' own pipeline loaded from the same folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures_bases import build_base_folder
from tests.fixtures_embed import write_snapshot

REPO = Path(__file__).resolve().parents[1]
SHORT = ["a red circle on the left", "a small blue square in the top right of a green picture"]
# About 110 tokens: two windows; its first 75 tokens are what the pipeline reads (truncation).
LONG = "a large yellow star on the left and a small white triangle on the right of a black background " * 4


@pytest.fixture(scope="module")
def sdxl_fp16_base(tmp_path_factory) -> Path:
    """An SDXL folder whose weights exist only as ``*.fp16.safetensors`` (another shape again)."""
    return build_base_folder(tmp_path_factory.mktemp("bases") / "tiny-sdxl-fp16", "sdxl", text_width=24,
                             text_width_2=40, projection_dim=16, unet_channels=(8, 16), variant="fp16", seed=2)


def _base(request, name: str) -> Path:
    return Path(request.getfixturevalue({"sd15": "sd15_base", "sdxl": "sdxl_base", "sdxl-fp16": "sdxl_fp16_base"}[name]))


def _pipeline_embeds(folder: Path, texts: list[str]):
    """``(prompt_embeds (B, 77, D), pooled (B, P) or None, negative_prompt_embeds, negative pooled)`` from diffusers."""
    from diffusers import DiffusionPipeline

    from omnidiff.contracts.base_folder import open_base_folder

    base = open_base_folder(folder)
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **base.load_kwargs())
    with torch.no_grad():
        if base.layout == "sd":
            embeds, negative = pipe.encode_prompt(texts, "cpu", 1, True)
            return embeds, None, negative, None
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            texts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return embeds, pooled, negative, negative_pooled


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sdxl-fp16"])
def test_base_text_spec_is_the_loaded_encoders_without_loading_it(request, name, monkeypatch):
    import transformers

    from omnidiff.contracts.encoders import STORED_WINDOWS, base_clip_spec, clip_inputs, fingerprint
    from omnidiff.models.clip_text import BaseTextEncoder

    folder = _base(request, name)
    loaded = BaseTextEncoder.from_base_folder(folder)

    def no_model(*args, **kwargs):
        raise AssertionError("naming a CLIP cache must not load the text towers")

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", no_model)
    monkeypatch.setattr(transformers.CLIPTextModelWithProjection, "from_pretrained", no_model)
    fingerprints = set()
    for windows in (1, 3):
        spec = base_clip_spec(folder, windows)
        assert spec.inputs == clip_inputs(loaded.fingerprint_inputs(windows), STORED_WINDOWS)
        assert spec.fingerprint == fingerprint(clip_inputs(loaded.fingerprint_inputs(windows), STORED_WINDOWS))
        fingerprints.add(spec.fingerprint)
    assert len(fingerprints) == 2  # the window count is a fingerprint input
    shape = {"sd15": (32,), "sdxl": (96, 24), "sdxl-fp16": (64, 16)}[name]
    assert spec.value_shape == shape
    assert (loaded.hidden_size, loaded.pooled_dim) == (shape[0], shape[-1])
    assert spec.inputs["encoder"]["empty_prompt"] == ("encoded" if name == "sd15" else "zeros")


def test_base_text_fingerprints_tell_the_folders_apart(sd15_base, sdxl_base, tmp_path):
    from omnidiff.contracts.encoders import base_clip_spec

    again = build_base_folder(tmp_path / "sd15-seed5", "sd15", seed=5)  # same shapes, other weights
    prints = {base_clip_spec(f, 3).fingerprint for f in (sd15_base, sdxl_base, again)}
    assert len(prints) == 3


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sdxl-fp16"])
def test_targets_are_what_the_pipeline_feeds_its_unet(request, name):
    from omnidiff.models.clip_text import WINDOW, BaseTextEncoder

    folder = _base(request, name)
    texts = [*SHORT, LONG]
    encoder = BaseTextEncoder.from_base_folder(folder)
    with torch.no_grad():
        states, mask, pooled = encoder.encode(texts, max_windows=3)  # (3, 231, D), (3, 231), (3, P)
    embeds, pooled_ref, _, _ = _pipeline_embeds(folder, texts)
    assert embeds.shape == (3, WINDOW, encoder.hidden_size)
    # Every position of the window, padding included, is the target (the UNet cross-attends to all 77).
    torch.testing.assert_close(states[:, :WINDOW], embeds, rtol=1e-5, atol=1e-5)
    if pooled_ref is not None:
        torch.testing.assert_close(pooled, pooled_ref, rtol=1e-5, atol=1e-5)
    assert mask.sum(1).tolist() == [WINDOW, WINDOW, 2 * WINDOW]  # the long caption uses a second window
    assert mask[:, :WINDOW].all() and not mask[:2, WINDOW:].any()
    second = states[2, WINDOW : 2 * WINDOW]
    assert second.abs().amax() > 0 and not torch.allclose(second, states[2, :WINDOW])
    assert not states[:, 2 * WINDOW :].any()  # a window the caption does not reach stays zero


def test_the_second_window_is_the_caption_continued(sd15_base):
    """Window 2 = the pipeline's encoding of the tokens after the first 75, as a caption of their own."""
    from omnidiff.models.clip_text import WINDOW, WINDOW_TOKENS, BaseTextEncoder

    encoder = BaseTextEncoder.from_base_folder(sd15_base)
    tokenizer = encoder.tokenizers[0]
    ids = tokenizer(LONG, add_special_tokens=False, verbose=False)["input_ids"]
    rest = tokenizer.decode(ids[WINDOW_TOKENS:])
    assert tokenizer(rest, add_special_tokens=False)["input_ids"] == ids[WINDOW_TOKENS:]  # round-trips
    with torch.no_grad():
        states, _, _ = encoder.encode([LONG], max_windows=2)
    embeds, _, _, _ = _pipeline_embeds(sd15_base, [rest])
    torch.testing.assert_close(states[0, WINDOW:], embeds[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_embed_caches_the_pipeline_targets_of_a_published_folder(request, name, tmp_path, capsys):
    """``omnidiff embed --config configs/embed.yaml "kinds=[clip]" clip.base_model=<folder>`` (issue 16)."""
    from embed_cache.cli import main
    from omnidiff.contracts.cache import CacheStore
    from omnidiff.contracts.encoders import base_clip_spec
    from omnidiff.contracts.keys import EMPTY_PROMPT, cache_key, text_key
    from omnidiff.models.clip_text import WINDOW

    folder = _base(request, name)
    snapshot = write_snapshot(f"base-{name}", [{"caption": c} for c in [*SHORT, LONG]], root=tmp_path / "snapshots")
    code = main(["--config", str(REPO / "configs" / "embed.yaml"), "kinds=[clip]", f"clip.base_model={folder}",
                 f"snapshots=[{snapshot}]", f"cache_root={tmp_path / 'cache'}", "executor=local", "track=false"])
    assert code == 0, capsys.readouterr().err
    spec = base_clip_spec(folder, 3)  # embed.yaml's clip.max_windows
    store = CacheStore(tmp_path / "cache" / "clip" / spec.fingerprint)
    report = store.verify()
    assert not report.corrupt and report.rows == 4  # three captions + ""
    keys = [cache_key(t)[1] for t in [*SHORT, LONG]]
    states, pooled = store.read(keys), store.read_pooled(keys)
    assert [states[k].shape[0] for k in keys] == [WINDOW, WINDOW, 2 * WINDOW]
    embeds, pooled_ref, negative, negative_pooled = _pipeline_embeds(folder, [*SHORT, LONG])
    cached = torch.from_numpy(np.stack([states[k][:WINDOW] for k in keys]).astype(np.float32))
    scale = float(embeds.abs().amax())
    torch.testing.assert_close(cached, embeds, rtol=2e-3, atol=2e-3 * scale)  # stored as float16
    empty = store.read([text_key(EMPTY_PROMPT)])[text_key(EMPTY_PROMPT)]
    empty_pooled = store.read_pooled([text_key(EMPTY_PROMPT)])[text_key(EMPTY_PROMPT)]
    assert empty.shape == (WINDOW, spec.value_shape[0])
    if name == "sdxl":  # force_zeros_for_empty_prompt: the unconditional embedding is zeros
        cached_pooled = torch.from_numpy(np.stack([pooled[k] for k in keys]).astype(np.float32))
        torch.testing.assert_close(cached_pooled, pooled_ref, rtol=2e-3, atol=2e-3 * float(pooled_ref.abs().amax()))
        assert not negative.any() and not negative_pooled.any()
        assert not np.any(empty) and not np.any(empty_pooled)
    else:  # SD encodes "" as its unconditional prompt
        torch.testing.assert_close(torch.from_numpy(empty.astype(np.float32)), negative[0], rtol=2e-3,
                                   atol=2e-3 * scale)


def test_a_folder_that_is_not_a_base_is_refused_naming_what_is_missing(sd15_base, tmp_path):
    import shutil

    from omnidiff.contracts.base_folder import BaseFolderError
    from omnidiff.contracts.encoders import base_clip_spec

    broken = tmp_path / "no-merges"
    shutil.copytree(sd15_base, broken)
    (broken / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(BaseFolderError, match=r"tokenizer: no tokenizer\.json and no merges\.txt"):
        base_clip_spec(broken, 3)
