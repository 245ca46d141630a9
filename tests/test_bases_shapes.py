"""Base folders of other shapes (issue 16 "Tests"): attention heads, transformer layers and resnets per
block, text heads and UNet depth vary, and the project's own pipeline still conditions and draws on each.

The session fixtures ``sd15_base`` / ``sdxl_base`` differ in those shapes too (tests/fixtures_bases.py);
here further folders are built per parametrisation, so no code can lean on one fixture's numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fixtures_bases import build_base_folder

SHAPES = {
    # arch, UNet channels, heads per block, transformer layers per block, resnets per block, text heads
    "sd15-3-levels": ("sd15", (16, 24, 32), (2, 3, 4), 1, 2, 4),
    "sd15-deep-attention": ("sd15", (16, 32), 4, (3, 2), 1, 8),
    "sdxl-3-levels": ("sdxl", (8, 16, 24), (1, 2, 6), (1, 1, 3), 1, (2, 8)),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_other_shapes_load_in_diffusers_and_draw_through_the_project_pipeline(name, tiny_llm, tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.models.adapter import OmniAdapter
    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.pipeline import OmniDiffusionPipeline
    from tests.fixtures_latent import fresh_adapter_folder
    from train.export import load_scheduler
    from train.model import load_unet, load_vae

    arch, channels, heads, layers, resnets, text_heads = SHAPES[name]
    folder = build_base_folder(tmp_path / name, arch, text_width=32, text_width_2=48, projection_dim=16,
                               unet_channels=channels, attention_heads=heads, transformer_layers_per_block=layers,
                               layers_per_block=resnets, text_heads=text_heads, seed=3)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    assert (unet_config["attention_head_dim"], unet_config["transformer_layers_per_block"]) == (as_list(heads),
                                                                                               as_list(layers))
    assert unet_config["layers_per_block"] == resnets and unet_config["block_out_channels"] == list(channels)
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text_config["num_attention_heads"] == (text_heads if isinstance(text_heads, int) else text_heads[0])
    base = open_base_folder(folder)
    assert base.cross_attention_dim == (32 if arch == "sd15" else 80)

    side = base.native_resolution
    diffusers_pipe = DiffusionPipeline.from_pretrained(folder)
    drawn = diffusers_pipe("a red circle", num_inference_steps=2, height=side, width=side, output_type="np").images
    assert drawn.shape == (1, side, side, 3) and np.isfinite(drawn).all()

    llm = LLMTextEncoder(tiny_llm)
    adapter = OmniAdapter.from_pretrained(fresh_adapter_folder(folder, tmp_path, llm_dim=llm.hidden_size) / "adapter")
    pipe = OmniDiffusionPipeline(load_unet(folder), load_scheduler(folder / "scheduler"), "llm_adapter",
                                 adapter=adapter, llm=llm, vae=load_vae(folder))
    torch.manual_seed(0)
    images = pipe(["a red circle", "一个蓝色的方块"], num_inference_steps=2, output_type="np")
    assert images.shape == (2, side, side, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])  # two prompts, two pictures
