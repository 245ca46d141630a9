"""The tiny published-layout SD 1.5 / SDXL folders load and run through diffusers' own pipelines."""

from __future__ import annotations

import json

import pytest

from tests.fixtures_bases import build_base_folder


@pytest.mark.parametrize("fixture", ["sd15_base", "sdxl_base"])
def test_published_layout_loads_in_diffusers(fixture, request):
    import numpy as np
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(fixture)
    index = json.loads((folder / "model_index.json").read_text())
    expected = {"sd15_base": "StableDiffusionPipeline", "sdxl_base": "StableDiffusionXLPipeline"}[fixture]
    assert index["_class_name"] == expected
    for name in [k for k in index if k.startswith("tokenizer")]:
        files = {p.name for p in (folder / name).iterdir()}
        assert {"vocab.json", "merges.txt"} <= files and "tokenizer.json" not in files, files
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == expected
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_fp16_variant_writes_only_fp16_weights(tmp_path):
    folder = build_base_folder(tmp_path / "sd", "sd15", text_width=24, variant="fp16")
    weights = sorted(p.name for p in folder.rglob("*.safetensors"))
    assert weights and all(".fp16." in name for name in weights), weights
