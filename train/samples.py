"""Sample grids during training: the fixed prompt set, every language, short and long.

The prompts' LLM states come from the cache (or are encoded once by the driver, outside the training
step), so sampling here needs only the adapter, the UNet, the scheduler config and, for a latent base
(SD, SDXL), its VAE: the grid shows decoded RGB images, not latents. Sampling follows the pipeline
(docs/interfaces.md "Pipeline"): DPM-Solver++ with Karras sigmas, thresholding on in pixel space
only (NOTES.md "Sampling pitfall"; diffusers documents it as unsuitable for latents), and the
adapter's output for "" as the unconditional embedding (PAPER.md "Release hyper-parameters").

Every rank draws its own share of the prompts (``prompts[rank::world]``) on its own device, and the
images (uint8, a few KB each) meet on rank 0 in one ``all_gather_object``: no rank waits at a
collective while another samples the whole grid (with an SD-size UNet on rank 0 alone that wait
could outlast the process group's timeout). Each prompt's noise is seeded by its index in the set,
so the grid is the same whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from omnidiff.pipeline import decode_latents, predict_noise, sampling_scheduler, sdxl_time_ids
from train.data import pad_states
from train.engine import final_weights


@torch.no_grad()
def sample_images(
    adapter,
    unet,
    scheduler_config: dict,
    prompt_states: Sequence[np.ndarray],
    empty_states: np.ndarray,
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    vae=None,
    seeds: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Images ``uint8 (N, H, W, 3)`` for N prompts given as unpadded LLM states ``[(L_i, Dl)]``.

    ``vae``: the base's ``AutoencoderKL``; the UNet then samples latents and the VAE decodes them.
    ``seeds``: one noise seed per prompt (default ``seed + i``).
    """
    adapter.eval()
    unet.eval()
    n = len(prompt_states)
    if n == 0:
        return np.zeros((0, 0, 0, 3), np.uint8)
    states, mask = pad_states(list(prompt_states))  # (N, T, Dl)
    cond, cond_pooled, cond_mask = adapter.condition(states.to(device), mask.to(device))  # (N, Q, D), (N, D), (N, Q)
    e_states, e_mask = pad_states([empty_states])  # (1, Te, Dl)
    uncond, uncond_pooled, uncond_mask = adapter.condition(e_states.to(device), e_mask.to(device))  # (1, Q, D) ...
    tokens = torch.cat([uncond.expand(n, -1, -1), cond])  # (2N, Q, D)
    pooled = torch.cat([uncond_pooled.expand(n, -1), cond_pooled])  # (2N, D)
    mask = torch.cat([uncond_mask.expand(n, -1), cond_mask])  # (2N, Q)

    scheduler = sampling_scheduler(scheduler_config, steps, latent=vae is not None)
    scheduler.set_timesteps(steps, device=device)
    size = int(unet.config.sample_size)
    side = size * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)  # pixels
    time_ids = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: uncropped, at the base's own size
        time_ids = sdxl_time_ids((side, side), (0, 0), (side, side)).expand(2 * n, 6).to(device)
    seeds = [seed + i for i in range(n)] if seeds is None else list(seeds)
    noise = [torch.randn(unet.config.out_channels, size, size, generator=torch.Generator().manual_seed(int(s)))
             for s in seeds]
    x = torch.stack(noise).to(device) * scheduler.init_noise_sigma  # (N, C, h, w)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)  # (2N, C, h, w)
        out = predict_noise(unet, x_in, t, tokens, pooled, mask, time_ids)  # (2N, C, h, w)
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        x = scheduler.step(guided, t, x).prev_sample
    if vae is not None:
        x = decode_latents(vae, x)  # (N, 3, H, W) in about [-1, 1]
    images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, 3, H, W)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def grid_figure(images: np.ndarray, labels: Sequence[str], title: str, columns: int = 6):
    """A matplotlib figure: one tile per image with its (language, length, prompt) label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title(labels[i], fontsize=6, wrap=True)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def prompt_label(prompt: str, lang: str, group: str, index: int, width: int = 40) -> str:
    """Tile title. Scripts the bundled fonts cannot draw (CJK, ...) are left to the prompts JSON logged beside."""
    if any(ord(ch) >= 0x2000 for ch in prompt):
        return f"[{lang}, {group}] prompt {index} (see .json)"
    text = prompt if len(prompt) <= width else prompt[: width - 3] + "..."
    return f"[{lang}, {group}] {text}"


def draw_share(cfg, job, adapter, unet, vae, rank: int, world: int, device) -> dict[int, np.ndarray]:
    """This rank's share of the grid: ``{prompt index: uint8 (H, W, 3)}`` for ``job.prompts[rank::world]``."""
    mine = list(range(rank, len(job.prompts), world))
    if not mine:
        return {}
    images = sample_images(
        adapter, unet, job.sampling_scheduler, [np.asarray(job.prompts[i]["states"]) for i in mine], job.empty_states,
        steps=cfg.samples.steps, guidance_scale=cfg.samples.guidance_scale, vae=vae,
        seeds=[cfg.samples.seed + i for i in mine], device=device,
    )  # fmt: skip
    return dict(zip(mine, images, strict=True))


def log_samples(cfg, job, state, ema, step: int, tracker, modules=None, rank: int = 0, world: int = 1,
                device: str | torch.device = "cpu") -> None:
    """A grid of ``job.prompts`` sampled with ``state`` (EMA where kept) at ``step``, logged through ``tracker``
    with the prompts as JSON beside it. Every rank calls it: each draws its share on ``device``, rank 0
    gathers and logs. ``modules``: ``(adapter, unet)`` already built."""
    from train.model import build_modules, load_vae

    adapter, unet = modules or build_modules(cfg, job, final_weights(state, ema))
    vae = load_vae(job.base_model)
    moved = [m for m in (adapter, unet, vae) if m is not None]
    homes = [next(m.parameters()).device for m in moved]
    for m in moved:
        m.to(device)
    try:
        share = draw_share(cfg, job, adapter, unet, vae, rank, world, device)
    finally:
        for m, home in zip(moved, homes, strict=True):
            m.to(home)
    shares = [share]
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, share)  # uint8 tiles: small next to the weights
    if rank != 0:
        return
    drawn = {i: img for part in shares for i, img in part.items()}
    prompts = job.prompts
    images = np.stack([drawn[i] for i in range(len(prompts))])  # (N, H, W, 3)
    labels = [prompt_label(p["prompt"], p["lang"], p["group"], i) for i, p in enumerate(prompts)]
    fig = grid_figure(images, labels, f"{cfg.name} stage {cfg.stage}, step {step}")
    if tracker is not None:
        tracker.figure(fig, f"samples/step_{step:06d}.png")
        tracker.json([{"index": i, "lang": p["lang"], "group": p["group"], "prompt": p["prompt"]}
                      for i, p in enumerate(prompts)], f"samples/step_{step:06d}.json")
    import matplotlib.pyplot as plt  # after grid_figure chose the Agg backend

    plt.close(fig)
