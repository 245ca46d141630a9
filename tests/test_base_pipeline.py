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


# ---------------------------------------------------------------- the pipeline flow on a published base

def test_latent_pixels_use_the_base_vae_at_its_native_resolution(sd15_base):
    from embed_cache.config import PixelsSection
    from flows.pipeline import latent_pixels, published_base

    base = published_base(sd15_base)
    assert base.native_resolution == 32
    pixels = latent_pixels(PixelsSection(), base)
    assert (pixels.vae, pixels.resolution) == (base.vae, 32)
    assert latent_pixels(PixelsSection(resolution=64), base).resolution == 64  # set: kept
    own = PixelsSection(vae=sd15_base / "elsewhere", resolution=16)
    assert latent_pixels(own, base) == own


def test_a_folder_of_another_layout_is_refused_naming_what_is_missing(tmp_path):
    from flows.pipeline import published_base
    from omnidiff.contracts.base_folder import BaseFolderError

    assert published_base(None) is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseFolderError, match="model_index.json"):
        published_base(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(BaseFolderError, match="KandinskyPipeline.*not a supported base"):
        published_base(tmp_path / "other")


def test_the_gpu_pipeline_config_takes_a_base_model(sd15_base):
    from flows.config import load_pipeline_config

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_pipeline_config(repo / "configs" / "gpu" / "pipeline_sdxl.yaml", [f"base_model={sd15_base}"])
    assert cfg.base_model == sd15_base


def _flow_config(tiny_llm, base_model, tmp_path):
    import socket

    from flows.config import load_pipeline_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    # embed.executor=auto: in process at the test world's size, as the demo's configs/embed.yaml chooses (what the
    # base folder changes is what is embedded, not where; Ray embed actors: tests/test_embed_job.py and the others)
    overrides = [f"base_model={base_model}", f"world_port={port}", f"embed.llm.path={tiny_llm}", "deploy=false",
                 "embed.executor=auto",
                 "evaluate.max_per_group=1", "evaluate.steps=2", "evaluate.real_images=16",
                 "evaluate.require_fit_evaluator=false", f"evaluate.report_dir={tmp_path / 'report'}"]
    overrides += [f"stage{i}.llm.path={tiny_llm}" for i in (1, 2, 3)]
    return load_pipeline_config(repo / "configs" / "pipeline_test.yaml", overrides)


@pytest.mark.e2e
def test_pipeline_flow_on_a_published_sd15_folder_builds_no_tiny_base(stack, tiny_llm, sd15_base, tmp_path):
    from flows.pipeline import omnidiff_pipeline

    out = omnidiff_pipeline(_flow_config(tiny_llm, sd15_base, tmp_path))
    assert out["base"]["base_model"] == str(sd15_base.resolve())
    for name in ("stage1", "stage2", "stage3"):
        export = json.loads((__import__("pathlib").Path(out[name]["export_dir"]) / "model_index.json").read_text())
        assert export["vae"] == ["diffusers", "AutoencoderKL"], export  # latent space: the base's VAE
    assert {"collect", "embed", "stage1", "stage2", "stage3", "evaluate"} <= set(out["timings_s"])
    assert out["evaluate"].get("report_html")


@pytest.mark.e2e
def test_pipeline_flow_fails_at_its_start_on_a_folder_that_is_no_base(stack, tiny_llm, tmp_path):
    from flows.pipeline import omnidiff_pipeline
    from omnidiff.contracts.base_folder import BaseFolderError

    (tmp_path / "nobase").mkdir()
    (tmp_path / "nobase" / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))
    with pytest.raises(BaseFolderError, match="UnCLIPPipeline.*not a supported base"):
        omnidiff_pipeline(_flow_config(tiny_llm, tmp_path / "nobase", tmp_path))
