"""omnidiff.contracts.base_folder: published SD 1.5 / SDXL folders and the tiny base, read from configs."""

from __future__ import annotations

import json
import shutil

import pytest

from omnidiff.contracts.base_folder import BaseFolderError, open_base_folder
from tests.fixtures_bases import build_base_folder


def test_sd15_layout(sd15_base):
    base = open_base_folder(sd15_base)
    assert base.layout == "sd" and base.hidden_layer == "last"
    assert [t.name for t in base.towers] == ["text_encoder"]
    assert base.cross_attention_dim == base.text_width == 32
    assert base.pooled_dim is None and not base.time_ids and not base.force_zeros_for_empty_prompt
    assert base.latent_space and base.vae_scale_factor == 2 and base.native_resolution == 32
    assert base.prediction_type == "epsilon" and base.variant is None
    assert base.load_kwargs() == {"use_safetensors": True}


def test_sdxl_layout(sdxl_base):
    base = open_base_folder(sdxl_base)
    assert base.layout == "sdxl" and base.hidden_layer == "penultimate"
    assert [t.width for t in base.towers] == [40, 56] and base.cross_attention_dim == 96
    assert base.pooled_dim == 24 and base.time_ids and base.force_zeros_for_empty_prompt
    assert base.vae_config["force_upcast"] is True


@pytest.mark.parametrize("widths", [(24, 40, 16), (48, 32, 8)])
def test_widths_come_from_the_folder(tmp_path, widths):
    w1, w2, proj = widths
    folder = build_base_folder(tmp_path / "xl", "sdxl", text_width=w1, text_width_2=w2, projection_dim=proj)
    base = open_base_folder(folder)
    assert (base.cross_attention_dim, base.pooled_dim) == (w1 + w2, proj)


def test_fp16_variant(tmp_path):
    base = open_base_folder(build_base_folder(tmp_path / "sd", "sd15", variant="fp16"))
    assert base.variant == "fp16" and base.load_kwargs()["variant"] == "fp16"


def test_tiny_omnidiff_base(tiny_base_model):
    base = open_base_folder(tiny_base_model)
    assert base.layout == "omnidiff" and not base.latent_space and base.vae_scale_factor == 1


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "model_index.json").unlink(), "no model_index.json"),
        (lambda f: shutil.rmtree(f / "text_encoder_2"), "missing text_encoder_2/"),
        (lambda f: (f / "tokenizer_2" / "merges.txt").unlink(), "no tokenizer.json and no merges.txt"),
        (lambda f: [p.rename(p.with_suffix(".bin")) for p in (f / "unet").glob("*.safetensors")], "safetensors only"),
        (lambda f: (f / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"})),
         "'KandinskyPipeline' is not a supported base"),
    ],
)
def test_broken_folders_name_what_is_missing(sdxl_base, tmp_path, damage, message):
    folder = _copy(sdxl_base, tmp_path)
    damage(folder)
    with pytest.raises(BaseFolderError, match=message.replace("(", r"\(").replace("/", "/")):
        open_base_folder(folder)


def test_cross_attention_must_match_the_text_towers(sd15_base, tmp_path):
    folder = _copy(sd15_base, tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 64
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseFolderError, match="cross_attention_dim=64 but the text encoders give 32"):
        open_base_folder(folder)
