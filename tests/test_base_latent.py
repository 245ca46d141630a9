"""Stages 2-3 in latent space on published-layout SD 1.5 and SDXL folders (issue 16 item 4).

    flock /tmp/omnidiff-heavy.lock .venv/bin/pytest tests/test_base_latent.py -x -q

The image cache holds VAE latents (the folder's scaling factor, fp32 where its VAE says force_upcast)
and each image's original size and crop; SDXL's UNet gets its time ids from them, as diffusers' own
``_get_add_time_ids`` builds them; the training schedule and prediction type are the folder's; no
thresholding on latents; sample grids are decoded RGB.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures_latent import adapter_takes_pooled_dim, embed_latents, run_stage2

SIZES = [(40, 32), (32, 56), (32, 32), (64, 48)]  # (width, height) as collected: crops on both axes


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _FixedAdapter(torch.nn.Module):
    """Stands in for the adapter where only the UNet's conditioning is under test: fixed tokens and pooled."""

    def __init__(self, width: int, pooled: int, queries: int = 5):
        super().__init__()
        self.tokens = torch.nn.Parameter(torch.randn(queries, width) * 0.1)
        self.pooled = torch.nn.Parameter(torch.randn(pooled) * 0.1)

    def condition(self, states, mask):
        b = states.shape[0]
        tokens = self.tokens.expand(b, -1, -1)
        return tokens, self.pooled.expand(b, -1), torch.ones(tokens.shape[:2], dtype=torch.bool)


@pytest.fixture(scope="module")
def sized_snapshot(tmp_path_factory):
    """Four captioned images of different sizes and aspect ratios (a snapshot through the real writer)."""
    from tests.fixtures_embed import write_snapshot

    root = tmp_path_factory.mktemp("sized")
    rows = [{"caption": f"a red circle number {i}", "image": _png(w, h, i)} for i, (w, h) in enumerate(SIZES)]
    return write_snapshot("sized", rows, root=root)


def test_latent_cache_keeps_sizes_and_sdxl_time_ids_match_diffusers(sdxl_base, sized_snapshot, tiny_llm, tmp_path):
    """The cache's original sizes and crops are the images' own; CachedBatches' time ids equal
    StableDiffusionXLPipeline._get_add_time_ids for each image; the UNet's time projection reads exactly them."""
    from diffusers import StableDiffusionXLPipeline

    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.contracts.cache import CacheStore
    from omnidiff.contracts.keys import digest_bytes
    from omnidiff.contracts.snapshot import Snapshot
    from train.data import CachedBatches, diffusion_examples
    from train.losses import compute_diffusion_loss
    from train.model import load_noise_scheduler, load_unet

    base = open_base_folder(sdxl_base)
    resolution = base.native_resolution
    dirs = embed_latents(sized_snapshot, sdxl_base, tiny_llm, tmp_path / "cache")
    store = CacheStore(dirs["pixels"])
    assert store.manifest["fingerprint_inputs"]["vae"]["upcast"] is True  # SDXL's VAE config says force_upcast
    assert store.value_shape == (4, resolution // base.vae_scale_factor, resolution // base.vae_scale_factor)
    sizes = store.read_sizes([digest_bytes(_png(w, h, i)) for i, (w, h) in enumerate(SIZES)])
    for i, (w, h) in enumerate(SIZES):
        scale = resolution / min(w, h)
        rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        expected = [h, w, (rh - resolution) // 2, (rw - resolution) // 2]
        assert sizes[digest_bytes(_png(w, h, i))].tolist() == expected

    pairs = Snapshot.open(sized_snapshot).pairs(["caption", "lang", "split", "image_digest"]).to_pandas()
    examples = diffusion_examples(pairs, "train")
    stores = {"llm": CacheStore(dirs["llm"]), "pixels": store}
    batches = CachedBatches(examples, "diffusion", stores, seed=0)
    positions = np.arange(len(examples))
    batch = batches.batch(positions)
    keys = examples["pixel_key"].iloc[batches.example_index(positions)].tolist()  # the batch's row order
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, use_safetensors=True)
    all_sizes = store.read_sizes(keys)
    for row, key in enumerate(keys):
        h, w, top, left = all_sizes[key].tolist()
        theirs = pipe._get_add_time_ids((h, w), (top, left), (resolution, resolution), dtype=torch.float32,
                                        text_encoder_projection_dim=base.pooled_dim)  # (1, 6)
        torch.testing.assert_close(batch["time_ids"][row].float(), theirs[0])
    assert len({tuple(r) for r in batch["time_ids"].tolist()}) == len(SIZES)  # not one constant

    unet = load_unet(sdxl_base)
    seen = []
    unet.add_time_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    torch.manual_seed(0)
    adapter = _FixedAdapter(base.cross_attention_dim, base.pooled_dim)
    loss, _ = compute_diffusion_loss(batch, {"adapter": adapter, "unet": unet},
                                     noise_scheduler=load_noise_scheduler(sdxl_base), min_snr_gamma=5.0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(seen[0].float(), batch["time_ids"].flatten().float())
    del batch["time_ids"]
    with pytest.raises(ValueError, match="needs time_ids"):
        compute_diffusion_loss(batch, {"adapter": adapter, "unet": unet},
                               noise_scheduler=load_noise_scheduler(sdxl_base), min_snr_gamma=5.0)


def test_training_schedule_and_prediction_type_are_the_folders(sd15_base, tmp_path):
    """SD ships a PNDM scheduler config: training gets a DDPM schedule with its betas and prediction type;
    a v_prediction folder trains on v; sampling latents never thresholds, pixel space still does."""
    from diffusers import PNDMScheduler

    from omnidiff.pipeline import sampling_scheduler
    from train.losses import diffusion_target
    from train.model import load_noise_scheduler

    train = load_noise_scheduler(sd15_base)
    published = PNDMScheduler.from_pretrained(sd15_base / "scheduler")
    assert type(train).__name__ == "DDPMScheduler"
    torch.testing.assert_close(train.alphas_cumprod, published.alphas_cumprod)
    assert train.config.prediction_type == "epsilon"

    folder = shutil.copytree(sd15_base, tmp_path / "sd15-v")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    v_train = load_noise_scheduler(folder)
    assert v_train.config.prediction_type == "v_prediction"
    x, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(diffusion_target(v_train, x, noise, t), v_train.get_velocity(x, noise, t))

    assert sampling_scheduler(config, 4, latent=True).config.thresholding is False
    assert sampling_scheduler(config, 4, latent=False).config.thresholding is True


def test_sample_grid_is_decoded_rgb_and_the_same_for_any_worker_count(sd15_base, tiny_llm, tmp_path):
    """Grids decode latents through the base's VAE to (H, W, 3) at the pixel size; every rank drawing its
    share (prompts[rank::world], noise seeded by prompt index) gives the grid one rank draws."""
    from types import SimpleNamespace

    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.models.adapter import OmniAdapter
    from omnidiff.models.llm import LLMTextEncoder
    from tests.fixtures_latent import fresh_adapter_folder
    from train.config import SamplesSection
    from train.model import load_unet, load_vae
    from train.samples import draw_share, sample_images

    base = open_base_folder(sd15_base)
    adapter = OmniAdapter.from_pretrained(fresh_adapter_folder(sd15_base, tmp_path) / "adapter").eval()
    unet, vae = load_unet(sd15_base).eval(), load_vae(sd15_base)
    llm = LLMTextEncoder(tiny_llm)
    texts = ["a red circle", "一个蓝色的方块", "a green star on the left " * 8]
    states, mask = llm.encode(["", *texts])
    per_text = [states[i, mask[i]].numpy().astype(np.float16) for i in range(len(texts) + 1)]
    scheduler_config = json.loads((sd15_base / "scheduler" / "scheduler_config.json").read_text())

    t0 = time.perf_counter()
    images = sample_images(adapter, unet, scheduler_config, per_text[1:], per_text[0], steps=3, vae=vae)
    seconds = time.perf_counter() - t0
    side = base.native_resolution
    assert images.shape == (3, side, side, 3) and images.dtype == np.uint8
    assert side == unet.config.sample_size * base.vae_scale_factor != unet.config.sample_size
    print(f"[samples] 3 prompts x 3 steps on the tiny SD 1.5 fixture (UNet + VAE decode, CPU): {seconds:.2f}s")

    job = SimpleNamespace(prompts=[{"states": s} for s in per_text[1:]], empty_states=per_text[0],
                          sampling_scheduler=scheduler_config)
    cfg = SimpleNamespace(samples=SamplesSection(steps=3, guidance_scale=3.0, seed=7))
    one = draw_share(cfg, job, adapter, unet, vae, rank=0, world=1, device="cpu")
    two = {**draw_share(cfg, job, adapter, unet, vae, rank=0, world=2, device="cpu"),
           **draw_share(cfg, job, adapter, unet, vae, rank=1, world=2, device="cpu")}
    assert sorted(one) == sorted(two) == [0, 1, 2]
    for i in one:
        assert one[i].shape == (side, side, 3)
        # Same prompt, same noise: the same image. A rank draws its share as one batch, and a float
        # reduction over a different batch can round one channel of one pixel to the next grey level
        # (seen: 1 value of 3072); a different noise or prompt would change most of them.
        diff = np.abs(one[i].astype(np.int16) - two[i].astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())


def test_stage2_on_sd15_latents_lowers_its_loss_and_exports_the_vae(sd15_stage2):
    """Six steps of stage 2 on the SD 1.5 folder's latents (gradient checkpointing on): the fixed
    validation batch's loss is finite and falls; the export carries the base's VAE and a sampler
    without thresholding."""
    val = {int(k): v for k, v in sd15_stage2["val_loss"].items()}
    first, last = val[0], val[max(val)]
    assert np.isfinite(list(val.values())).all()
    assert last < first, f"val loss {first:.4f} -> {last:.4f}"
    export = Path(sd15_stage2["export_dir"])
    assert (export / "vae" / "config.json").is_file()
    sampler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert sampler["_class_name"] == "DPMSolverMultistepScheduler" and sampler["thresholding"] is False


@pytest.mark.skipif(not adapter_takes_pooled_dim(),
                    reason="OmniAdapter has no pooled_dim yet (issue 16 item 3 is another branch's)")
def test_stage2_on_sdxl_latents_lowers_its_loss(sdxl_base, train_snapshot, tiny_llm, latent_caches,
                                                latent_cache_root, tmp_path):
    """Six steps of stage 2 on the SDXL folder: text_embeds from the adapter's pooled head, time ids
    from the cached sizes; the fixed validation batch's loss is finite and falls."""
    result = run_stage2(sdxl_base, "sdxl-s2", train_snapshot, tiny_llm, latent_caches, latent_cache_root, tmp_path)
    val = {int(k): v for k, v in result["val_loss"].items()}
    assert np.isfinite(list(val.values())).all()
    assert val[max(val)] < val[0], f"val loss {val[0]:.4f} -> {val[max(val)]:.4f}"


def test_pipeline_samples_sdxl_latents_with_time_ids_and_decodes_them(sdxl_base, tiny_llm):
    """OmniDiffusionPipeline on the SDXL folder: the UNet reads the pooled embedding as text_embeds and
    (H, W, 0, 0, H, W) as time ids, the sampler does not threshold latents, the VAE decodes RGB."""
    from types import SimpleNamespace

    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.pipeline import OmniDiffusionPipeline
    from train.export import load_scheduler
    from train.model import load_unet, load_vae

    base = open_base_folder(sdxl_base)
    llm = LLMTextEncoder(tiny_llm)
    torch.manual_seed(0)
    adapter = _FixedAdapter(base.cross_attention_dim, base.pooled_dim)
    adapter.shape = SimpleNamespace(out_dim=base.cross_attention_dim, llm_dim=llm.hidden_size, pooled_dim=base.pooled_dim)
    pipe = OmniDiffusionPipeline(load_unet(sdxl_base), load_scheduler(sdxl_base / "scheduler"), "llm_adapter",
                                 adapter=adapter, llm=llm, vae=load_vae(sdxl_base))
    assert pipe.scheduler.config.thresholding is False
    seen = []
    pipe.unet.add_time_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    side = base.native_resolution
    images = pipe(["a red circle", "一个蓝色的方块"], num_inference_steps=2, output_type="np")
    assert images.shape == (2, side, side, 3) and images.dtype == np.uint8
    expected = torch.tensor([side, side, 0, 0, side, side]).repeat(4)  # (uncond + cond) x 2 prompts
    torch.testing.assert_close(seen[0].float(), expected.float())


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a_fixed_latent_batch_loss_is_finite_and_falls(arch, sd15_base, sdxl_base, sized_snapshot, tiny_llm, tmp_path):
    """The stage-2 objective on cached latents (no DeepSpeed: the loss alone): adapter + the folder's UNet,
    the folder's schedule; a few AdamW steps on one fixed batch lower the loss."""
    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.contracts.cache import CacheStore
    from omnidiff.contracts.snapshot import Snapshot
    from omnidiff.models.adapter import OmniAdapter
    from tests.fixtures_latent import fresh_adapter_folder
    from train.data import CachedBatches, diffusion_examples
    from train.losses import compute_diffusion_loss
    from train.model import load_noise_scheduler, load_unet

    folder = sd15_base if arch == "sd15" else sdxl_base
    base = open_base_folder(folder)
    dirs = embed_latents(sized_snapshot, folder, tiny_llm, tmp_path / "cache")
    stores = {"llm": CacheStore(dirs["llm"]), "pixels": CacheStore(dirs["pixels"])}
    pairs = Snapshot.open(sized_snapshot).pairs(["caption", "lang", "split", "image_digest"]).to_pandas()
    batch = CachedBatches(diffusion_examples(pairs, "train"), "diffusion", stores, seed=0).batch(np.arange(4))
    assert ("time_ids" in batch) and batch["pixels"].shape[1:] == stores["pixels"].value_shape
    if base.pooled_dim is not None and not adapter_takes_pooled_dim():
        torch.manual_seed(0)
        adapter = _FixedAdapter(base.cross_attention_dim, base.pooled_dim)  # until the adapter has pooled_dim
    else:
        adapter = OmniAdapter.from_pretrained(fresh_adapter_folder(folder, tmp_path) / "adapter")
    unet = load_unet(folder).train()
    modules = {"adapter": adapter.train(), "unet": unet}
    schedule = load_noise_scheduler(folder)
    opt = torch.optim.AdamW([*adapter.parameters(), *unet.parameters()], lr=1e-3)
    losses = []
    for _ in range(12):
        loss, _ = compute_diffusion_loss(batch, modules, noise_scheduler=schedule, min_snr_gamma=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
