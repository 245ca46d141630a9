"""Sample grids during training: the fixed prompt set, every language, short and long.

The prompts' LLM states come from the cache (or are encoded once by the driver, outside the training
step), so sampling here needs only the adapter, the UNet and the scheduler config. Sampling follows
the pipeline (docs/interfaces.md "Pipeline"): DPM-Solver++ with Karras sigmas, thresholding on (the
first step otherwise magnifies the model's error ~100x, NOTES.md "Sampling pitfall"), and the
adapter's output for "" as the unconditional embedding (PAPER.md "Release hyper-parameters").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from omnidiff.pipeline import predict_noise, sampling_scheduler
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
) -> np.ndarray:
    """Images ``uint8 (N, H, W, 3)`` for N prompts given as unpadded LLM states ``[(L_i, Dl)]``."""
    adapter.eval()
    unet.eval()
    n = len(prompt_states)
    states, mask = pad_states(list(prompt_states))  # (N, T, Dl)
    cond, cond_pooled, cond_mask = adapter.condition(states, mask)  # (N, Q, D), (N, D), (N, Q)
    e_states, e_mask = pad_states([empty_states])  # (1, Te, Dl)
    uncond, uncond_pooled, uncond_mask = adapter.condition(e_states, e_mask)  # (1, Q, D), (1, D), (1, Q)
    tokens = torch.cat([uncond.expand(n, -1, -1), cond])  # (2N, Q, D)
    pooled = torch.cat([uncond_pooled.expand(n, -1), cond_pooled])  # (2N, D)
    mask = torch.cat([uncond_mask.expand(n, -1), cond_mask])  # (2N, Q)

    scheduler = sampling_scheduler(scheduler_config, steps)
    scheduler.set_timesteps(steps)
    size = int(unet.config.sample_size)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, unet.config.in_channels, size, size, generator=g) * scheduler.init_noise_sigma  # (N, C, H, W)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)  # (2N, C, H, W)
        out = predict_noise(unet, x_in, t, tokens, pooled, mask)  # (2N, C, H, W)
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        x = scheduler.step(guided, t, x).prev_sample
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
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


def log_samples(cfg, job, state, ema, step: int, tracker, modules=None) -> None:
    """A grid of ``job.prompts`` sampled with ``state`` (EMA where kept) at ``step``, logged through ``tracker``
    with the prompts as JSON beside it (rank 0 only). ``modules``: ``(adapter, unet)`` already built."""
    from train.model import build_modules

    adapter, unet = modules or build_modules(cfg, job, final_weights(state, ema))
    prompts = job.prompts
    images = sample_images(
        adapter, unet, job.sampling_scheduler, [np.asarray(p["states"]) for p in prompts], job.empty_states,
        steps=cfg.samples.steps, guidance_scale=cfg.samples.guidance_scale, seed=cfg.samples.seed,
    )
    labels = [prompt_label(p["prompt"], p["lang"], p["group"], i) for i, p in enumerate(prompts)]
    fig = grid_figure(images, labels, f"{cfg.name} stage {cfg.stage}, step {step}")
    if tracker is not None:
        tracker.figure(fig, f"samples/step_{step:06d}.png")
        tracker.json([{"index": i, "lang": p["lang"], "group": p["group"], "prompt": p["prompt"]}
                      for i, p in enumerate(prompts)], f"samples/step_{step:06d}.json")
    import matplotlib.pyplot as plt  # after grid_figure chose the Agg backend

    plt.close(fig)
