"""Published SD / SDXL bases in the sampling pipeline and the pipeline flow (issue 16 items 1 and 6).

    .venv/bin/pytest tests/test_base_pipeline.py -x -q -m "not e2e"
    flock /tmp/omnidiff-heavy.lock .venv/bin/pytest tests/test_base_pipeline.py -x -q   # the flow runs too

The pipeline feeds zeros as the unconditional embedding where the base says so (SDXL's
``force_zeros_for_empty_prompt``, as diffusers' StableDiffusionXLPipeline.encode_prompt does), keeps the
flag in the export, and refuses an adapter whose pooled head does not fit the UNet's ``text_embeds``.
"""

from __future__ import annotations

import json

import pytest
import torch

from omnidiff.models.adapter import OmniAdapter
from omnidiff.models.llm import LLMTextEncoder

FAST = dict(num_inference_steps=2, guidance_scale=3.0, seed=0, output_type="np")


def _sdxl_parts(base):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(base / "vae", use_safetensors=True)
    scheduler = EulerDiscreteScheduler.from_pretrained(base / "scheduler")
    return unet, vae, scheduler


def _adapter(out_dim: int, pooled_dim: int | None) -> OmniAdapter:
    torch.manual_seed(0)
    return OmniAdapter(llm_dim=64, width=32, out_dim=out_dim, num_queries=8, encoder_layers=1, decoder_layers=1,
                       heads=4, input_norm=False, length_head=False, pooled_query=False, pooled_dim=pooled_dim)


def _record_unet_inputs(unet) -> list[dict]:
    """What the UNet is called with on each step (a forward pre-hook on the real module)."""
    seen: list[dict] = []

    def hook(module, args, kwargs):
        seen.append({"tokens": kwargs["encoder_hidden_states"].detach().clone(),
                     "pooled": kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()})

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_sdxl_export_feeds_zeros_as_the_unconditional_embedding(sdxl_base, tiny_llm, tmp_path):
    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.pipeline import OmniDiffusionPipeline

    folder = open_base_folder(sdxl_base)
    assert folder.force_zeros_for_empty_prompt and folder.pooled_dim
    unet, vae, scheduler = _sdxl_parts(sdxl_base)
    llm = LLMTextEncoder(tiny_llm)
    pipe = OmniDiffusionPipeline(unet, scheduler, "llm_adapter", adapter=_adapter(folder.cross_attention_dim,
                                                                                  folder.pooled_dim),
                                 llm=llm, vae=vae, force_zeros_for_empty_prompt=True)
    out = pipe.save_pretrained(tmp_path / "export")
    assert json.loads((out / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    loaded = OmniDiffusionPipeline.from_pretrained(out, llm=llm)
    assert loaded.force_zeros_for_empty_prompt is True

    seen = _record_unet_inputs(loaded.unet)
    loaded(["a red circle"], **FAST)
    assert len(seen) == 2
    for step in seen:  # [unconditional; conditional] in one batch
        assert step["tokens"].shape[0] == 2 and step["pooled"].shape == (2, folder.pooled_dim)
        assert torch.count_nonzero(step["tokens"][0]) == 0 and torch.count_nonzero(step["pooled"][0]) == 0
        assert torch.count_nonzero(step["tokens"][1]) > 0 and torch.count_nonzero(step["pooled"][1]) > 0
    # A real negative prompt is encoded, not zeroed.
    seen.clear()
    loaded(["a red circle"], negative_prompt="blue", **FAST)
    assert torch.count_nonzero(seen[0]["tokens"][0]) > 0 and torch.count_nonzero(seen[0]["pooled"][0]) > 0

    # Without the flag (SD 1.5, the tiny base) "" is the adapter's output for "", as before.
    loaded.force_zeros_for_empty_prompt = False
    seen.clear()
    loaded(["a red circle"], **FAST)
    assert torch.count_nonzero(seen[0]["tokens"][0]) > 0 and torch.count_nonzero(seen[0]["pooled"][0]) > 0


def test_pipeline_refuses_an_adapter_whose_pooled_width_the_unet_does_not_read(sdxl_base, tiny_llm):
    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.pipeline import OmniDiffusionPipeline

    folder = open_base_folder(sdxl_base)
    unet, vae, scheduler = _sdxl_parts(sdxl_base)
    wrong = _adapter(folder.cross_attention_dim, None)  # pooled head = token width (96), text_embeds reads 24
    assert wrong.shape.pooled_dim != folder.pooled_dim
    with pytest.raises(ValueError, match=rf"adapter pooled_dim {wrong.shape.pooled_dim} .*\({folder.pooled_dim}"):
        OmniDiffusionPipeline(unet, scheduler, "llm_adapter", adapter=wrong, llm=LLMTextEncoder(tiny_llm), vae=vae)
