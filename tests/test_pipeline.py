"""OmniDiffusionPipeline: build -> save_pretrained -> from_pretrained -> images, for both conditionings.

.venv/bin/pytest tests/test_pipeline.py -x -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from omnidiff.models.adapter import OmniAdapter
from omnidiff.models.clip_text import build_clip_text_encoder
from omnidiff.models.llm import LLMTextEncoder
from omnidiff.models.llm_folders import build_tiny_llm
from omnidiff.models.unet import build_unet
from omnidiff.pipeline import OmniDiffusionPipeline, predict_noise, sampling_scheduler

WORDS = "a red green blue circle square on the left right top bottom small big".split()
PROMPTS = ["a red circle on the left", "左边有一个红色的圆"]
FAST = dict(num_inference_steps=3, guidance_scale=3.0)


def _unet(cross_dim: int, pooled_dim: int | None = None, in_channels: int = 3):
    torch.manual_seed(0)
    return build_unet(16 if in_channels == 3 else 8, in_channels, in_channels, (16, 32), cross_dim, 1, 8, pooled_dim)


def _train_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    pipe = OmniDiffusionPipeline(
        _unet(32, pooled_dim=32), _train_scheduler(), "clip", text_encoder=build_clip_text_encoder(WORDS, 32, 1, 4)
    )
    return pipe.save_pretrained(tmp_path_factory.mktemp("clip_pipe"))


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory, tiny_llm):
    torch.manual_seed(0)
    adapter = OmniAdapter(llm_dim=64, width=32, out_dim=32, num_queries=8, encoder_layers=1, decoder_layers=1, heads=4,
                          input_norm=False, length_head=False, pooled_query=False)
    pipe = OmniDiffusionPipeline(
        _unet(32, pooled_dim=32), _train_scheduler(), "llm_adapter", adapter=adapter, llm=LLMTextEncoder(tiny_llm)
    )
    folder = tmp_path_factory.mktemp("llm_pipe")
    return pipe.save_pretrained(folder, lineage={"stage2_run_id": "abc"})


def test_folder_layout_is_safetensors_and_json_only(clip_folder, llm_folder):
    for folder in (clip_folder, llm_folder):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert {p.suffix for p in files if p.suffix != ".py"} <= {".json", ".safetensors"}, files
    # The only code: the one-import files through which diffusers loads an llm_adapter folder (issue 16 item 5).
    shims = sorted(p.relative_to(llm_folder).as_posix() for p in llm_folder.rglob("*.py"))
    assert shims == ["adapter/omnidiff_component.py", "pipeline_omnidiff.py", "text_encoder/omnidiff_component.py"]
    for shim in shims:
        code = [line for line in (llm_folder / shim).read_text().splitlines() if line and not line.startswith('"""')]
        assert len(code) == 1 and code[0].startswith("from omnidiff.pipeline_diffusers import "), code
    assert not list(clip_folder.rglob("*.py"))
    assert json.loads((clip_folder / "model_index.json").read_text())["conditioning"] == "clip"
    assert (clip_folder / "text_encoder" / "model.safetensors").exists() and (clip_folder / "tokenizer").is_dir()
    index = json.loads((llm_folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_omnidiff", "OmniDiffusersPipeline"] and index["conditioning"] == "llm_adapter"
    ref = json.loads((llm_folder / "text_encoder" / "encoder.json").read_text())
    assert len(ref["weights_digest"]) == 64 and ref["layer"] == 2
    assert json.loads((llm_folder / "lineage.json").read_text()) == {"stage2_run_id": "abc"}
    sched = json.loads((llm_folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DPMSolverMultistepScheduler" and sched["thresholding"] is True


@pytest.mark.parametrize("which", ["clip_folder", "llm_folder"])
def test_generate_from_folder(which, request):
    pipe = OmniDiffusionPipeline.from_pretrained(request.getfixturevalue(which))
    images = pipe(PROMPTS, seed=7, **FAST)
    assert len(images) == 2 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    again = pipe(PROMPTS, seed=7, **FAST)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))
    other = pipe(PROMPTS, seed=8, **FAST)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))
    # an image depends on its prompt and seed, not on its batch mates
    alone = pipe(PROMPTS[1:], seed=[8], **FAST)
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(images[1]), atol=1)
    arr = pipe(PROMPTS[:1], seed=7, output_type="np", height=32, width=32, **FAST)
    assert arr.shape == (1, 32, 32, 3) and arr.dtype == np.uint8


def test_encode_prompt_shapes(clip_folder, llm_folder):
    clip = OmniDiffusionPipeline.from_pretrained(clip_folder)
    tokens, pooled, mask = clip.encode_prompt(PROMPTS + [""])
    assert tokens.shape == (3, 77, 32) and pooled.shape == (3, 32) and mask.shape == (3, 77)
    assert mask.sum(1).tolist()[2] == 2, "'' is <bos><eos>"
    ours = OmniDiffusionPipeline.from_pretrained(llm_folder)
    tokens, pooled, mask = ours.encode_prompt(PROMPTS)
    assert tokens.shape == (2, 8, 32) and pooled.shape == (2, 32) and mask.all()
    assert not torch.allclose(tokens[0], tokens[1]), "the LLM side reads Chinese"


def test_roundtrip_gives_the_same_images(tmp_path, tiny_llm):
    adapter = OmniAdapter(64, 32, 32, 8, 1, 1, 4, input_norm=False, length_head=False, pooled_query=False)
    pipe = OmniDiffusionPipeline(
        _unet(32, 32), _train_scheduler(), "llm_adapter", adapter=adapter, llm=LLMTextEncoder(tiny_llm)
    )
    before = pipe(PROMPTS, output_type="np", **FAST)
    after = OmniDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "p"))(
        PROMPTS, output_type="np", **FAST
    )
    np.testing.assert_array_equal(before, after)


def test_guidance_uses_the_prompt(clip_folder):
    pipe = OmniDiffusionPipeline.from_pretrained(clip_folder)
    a = pipe(["a red circle"], seed=0, output_type="np", num_inference_steps=3, guidance_scale=5.0)
    b = pipe(["a blue square"], seed=0, output_type="np", num_inference_steps=3, guidance_scale=5.0)
    c = pipe(["a red circle"], seed=0, output_type="np", num_inference_steps=3, guidance_scale=0.0)
    assert not np.array_equal(a, b)
    d = pipe(["a blue square"], seed=0, output_type="np", num_inference_steps=3, guidance_scale=0.0)
    np.testing.assert_array_equal(c, d)  # guidance 0 = the unconditional branch only


def test_missing_or_different_llm_is_a_clear_error(tmp_path, llm_folder, tiny_llm):
    moved = tmp_path / "pipe"
    shutil.copytree(llm_folder, moved)
    ref_path = moved / "text_encoder" / "encoder.json"
    ref = json.loads(ref_path.read_text())
    ref.update(path=str(tmp_path / "nowhere"), folder_name="no-such-llm")
    ref_path.write_text(json.dumps(ref))
    with pytest.raises(FileNotFoundError, match="no-such-llm|nowhere"):
        OmniDiffusionPipeline.from_pretrained(moved)
    other = build_tiny_llm(tmp_path / "other-llm", seed=1)
    with pytest.raises(ValueError, match="weights digest"):
        OmniDiffusionPipeline.from_pretrained(moved, llm_path=other)
    pipe = OmniDiffusionPipeline.from_pretrained(moved, llm_path=tiny_llm)
    assert pipe.llm.path == tiny_llm


def test_bad_arguments(clip_folder, tmp_path):
    pipe = OmniDiffusionPipeline.from_pretrained(clip_folder)
    with pytest.raises(ValueError, match="height=17"):
        pipe(["a"], height=17, **FAST)
    with pytest.raises(ValueError, match="seeds for 2 prompts"):
        pipe(["a", "b"], seed=[1], **FAST)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        OmniDiffusionPipeline.from_pretrained(tmp_path)


def test_vae_slot_gives_pixel_images(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    pipe = OmniDiffusionPipeline(
        _unet(32, in_channels=4),
        _train_scheduler(),
        "clip",
        text_encoder=build_clip_text_encoder(WORDS, 32, 1, 4),
        vae=vae,
    )
    loaded = OmniDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "sd"))
    assert loaded.vae is not None
    images = loaded(["a red circle"], **FAST)
    assert images[0].size == (16, 16), "latents 8x8 decode to 16x16 pixels"


def test_sampler_settings():
    linear = sampling_scheduler(DDPMScheduler(beta_schedule="linear").config)
    assert isinstance(linear, DPMSolverMultistepScheduler)
    assert linear.config.use_karras_sigmas and linear.config.thresholding
    cosine = sampling_scheduler(_train_scheduler().config)
    cosine.set_timesteps(20)
    assert len(set(cosine.timesteps.tolist())) == 20 and cosine.config.thresholding


def test_predict_noise_passes_pooled_only_when_built_for_it():
    x, ctx, mask = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.bool)
    with_pooled = _unet(32, pooled_dim=32).eval()
    a = predict_noise(with_pooled, x, 5, ctx, torch.zeros(1, 32), mask)
    b = predict_noise(with_pooled, x, 5, ctx, torch.ones(1, 32), mask)
    assert not torch.allclose(a, b)
    without = _unet(32).eval()
    torch.testing.assert_close(
        predict_noise(without, x, 5, ctx, torch.zeros(1, 32), mask),
        predict_noise(without, x, 5, ctx, torch.ones(1, 32), mask),
    )
    # masked context positions are not attended
    ctx2 = ctx.clone()
    ctx2[0, 3] = 100.0
    mask[0, 3] = False
    torch.testing.assert_close(
        predict_noise(without, x, 5, ctx, None, mask), predict_noise(without, x, 5, ctx2, None, mask)
    )


def test_loading_needs_no_training_code(llm_folder, clip_folder):
    code = (
        "import sys\n"
        "from omnidiff.pipeline import OmniDiffusionPipeline\n"
        f"for f in [{str(llm_folder)!r}, {str(clip_folder)!r}]:\n"
        "    OmniDiffusionPipeline.from_pretrained(f)(['a red circle'], num_inference_steps=2)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('train', 'data_prep', 'embed_cache', 'flows', 'serve',"
        " 'deepspeed', 'ray', 'prefect', 'mlflow')]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_predict_noise_cuts_trailing_text_positions_no_row_reads():
    """Padding past every row's last real token is cut before the UNet: the same noise prediction as
    with the padding (masked keys change nothing), for rows of different lengths in one batch."""
    torch.manual_seed(0)
    unet = _unet(32, pooled_dim=32).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    ctx, pooled = torch.randn(2, 6, 32), torch.randn(2, 32)
    mask = torch.tensor([[True, True, True, False, False, False], [True, True, False, False, False, False]])
    padded = torch.cat([ctx, torch.randn(2, 40, 32) * 50], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 40, dtype=torch.bool)], 1)
    with torch.no_grad():
        short = predict_noise(unet, x, t, ctx[:, :3], pooled, mask[:, :3])
        long = predict_noise(unet, x, t, padded, pooled, padded_mask)
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-5)


def test_a_prompt_drawn_with_several_seeds_is_encoded_once(llm_folder):
    # issue 18: the evaluate stage draws each prompt with several seeds in one batch; the LLM reads it once
    pipe = OmniDiffusionPipeline.from_pretrained(llm_folder)
    seen: list[list[str]] = []
    encode = pipe.encode_prompt

    def counting(prompts):
        seen.append(list(prompts))
        return encode(prompts)

    pipe.encode_prompt = counting
    images = pipe([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[0]], seed=[3, 4, 5, 3], output_type="np", **FAST)
    assert seen == [[PROMPTS[0], PROMPTS[1]], [""]]  # each distinct prompt once, and "" once for guidance
    np.testing.assert_array_equal(images[0], images[3])  # same prompt, same seed
    assert not np.array_equal(images[0], images[1])  # same prompt, another seed
    single = pipe([PROMPTS[1]], seed=[5], output_type="np", **FAST)
    np.testing.assert_allclose(single[0], images[2], atol=1)  # as if drawn alone
