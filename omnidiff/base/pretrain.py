"""Pretrain the base text-to-image model: a CLIP-style text encoder + a pixel-space UNet.

    omnidiff base pretrain --config configs/base.yaml            # ~8 min on 2 CPU cores, then cached

This model plays Stable Diffusion's part (PAPER.md "The problem"): English only
(a word vocabulary from the world's English captions, every other word is
<unk>), one hard 77-token window (long captions lose everything after token 75,
as CLIP's would), conditioning on the per-token states (cross-attention) plus
the pooled <eos> state. Text encoder and UNet train together from scratch with
the diffusion loss on the world's (image, English caption) pairs; ~10% of
captions are dropped to "" so classifier-free guidance works.

The recipe in configs/base.yaml, each part measured here on the demo world (48 images of short
English prompts, 20-step DPM-Solver, guidance 3, judged by the evaluator, with
``benchmarks/base_samplers.py``):
- v-prediction (``pretrain.prediction_type``; v = alpha * noise - sigma * image). With noise
  prediction on the cosine schedule, samples came out with backgrounds in colours the world never
  has (background right 21-31%, chance 33%, with DDPM-100, DDIM-50 and DPM-Solver alike): the
  noise loss weights an error in the predicted image by (alpha/sigma)^2, ~1/40 at t=900, so the
  noisy steps that fix an image's overall colour are barely trained. With v: background 100%.
- word embeddings drawn with std 1 (``text_encoder.token_init_std``; CLIP's init is 0.02, under
  the ~0.3 per dim that the random residual layers add, so a fresh encoder's states barely say
  which word sits where) and Min-SNR-gamma 5 loss weighting (``pretrain.min_snr_gamma``):
  colour 17% -> 100%, size 58% -> 90% at 700 steps.
- 1000 steps: shape 21% -> 96%, colour 100%, size 98%, background 100%; position stayed at chance.
- Position (issue 18 item 2, ``benchmarks/base_position.py``): the corner a shape went to followed the
  noise, not the words (one prompt in its four corner wordings from the same noise: the same corner for
  81% of seeds), while the text encoder's token states encode it (linear probe 99.7%) and the judge reads
  it on renders (100%). Two changes: the pixel coordinates as two input channels
  (``unet.coord_channels``; alone: position 26%, the noise still decided), and ``pretrain.min_snr_floor``
  1: plain Min-SNR weights a v step by ~SNR at the noisiest steps (<0.01 at t=999), exactly the steps
  that decide where the shape goes; the floor gives them weight ~1. Measured at full size it made things worse
  (position 26%, shape 17%, colour 28%: benchmarks/base_position_results.md), so it stays off.
The choice of target is saved in the scheduler config, which the pipeline's sampler and
stages 2-3 (train/losses.py) read.

Seeded and reproducible: the same config and world give the same weights
(init, batch order, noise and timesteps all come from ``pretrain.seed``). The
result is a pipeline folder (conditioning ``clip``) cached at
``models_dir()/base/<hash of the config's model part + the world's pairs digest>/`` and
reused when present (``force=true`` retrains).

Decision (issue 2): the first ``make demo`` pretrains the base model (about
8 CPU minutes) and every later run reuses the cache, rather than shipping
weights. The weights then always match the world and the code that made them,
the command and seed that made them are in the folder's ``base.json`` and the
MLflow run, and no binary blobs live in the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from omnidiff.base.config import BaseConfig
from omnidiff.config import load_config, to_dict
from omnidiff.env import models_dir
from omnidiff.progress import Progress
from omnidiff.text import normalise_caption

log = logging.getLogger("omnidiff.base")
PRETRAIN_VERSION = 1  # bump when the training code changes what a config produces
GRID_PROMPTS = 32
LAYOUT_WARMUP = 20  # linear lr warm-up of the layout phase (pretrain.high_noise_steps)


# -- data ---------------------------------------------------------------------------------------
def resolve_world(cfg: BaseConfig) -> Path:
    """The world folder: ``cfg.world_dir`` if set, else the world of ``cfg.world_config`` (generated once)."""
    from omnidiff.world import WorldConfig, generate_world, load_world_meta

    if cfg.world_dir is not None:
        load_world_meta(cfg.world_dir)  # clear error when it is not a world
        return Path(cfg.world_dir).resolve()
    return generate_world(load_config(WorldConfig, cfg.world_config))


def load_pairs(world_dir: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """(images float (N, 3, R, R) in [-1, 1], English captions (N,)) of the world's training pairs.

    Images are box-downsampled to ``resolution`` (what img2dataset's area resize does for the
    collected snapshot), so the base model sees the same pixels the later stages train on.
    """
    pairs = pd.read_parquet(world_dir / "pairs.parquet", columns=["image", "caption_en"])
    if pairs["caption_en"].isna().any():
        raise ValueError(f"{world_dir}/pairs.parquet: {int(pairs['caption_en'].isna().sum())} rows lack caption_en")
    images = np.empty((len(pairs), resolution, resolution, 3), dtype=np.uint8)
    for i, rel in enumerate(pairs["image"]):
        with Image.open(world_dir / rel) as im:
            im = im.convert("RGB")
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BOX)
            images[i] = np.asarray(im)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, R, R)
    # The pipeline normalises prompts before encoding; captions get the same treatment.
    return x, [normalise_caption(c) for c in pairs["caption_en"]]


# -- models -------------------------------------------------------------------------------------
def build_models(cfg: BaseConfig):
    """(text encoder, UNet, DDPM noise scheduler) with fresh weights seeded by ``pretrain.seed``."""
    from diffusers import DDPMScheduler

    from omnidiff.models.clip_text import build_clip_text_encoder
    from omnidiff.models.unet import build_unet
    from omnidiff.world import english_vocabulary

    te = cfg.text_encoder
    torch.manual_seed(cfg.pretrain.seed)
    text_encoder = build_clip_text_encoder(english_vocabulary(), te.hidden, te.layers, te.heads, seed=cfg.pretrain.seed)
    # CLIP's init draws word embeddings with std 0.02 while the random attention/MLP residuals add
    # ~0.3 per dim, so a fresh encoder's states barely say which word sits where, and the UNet has
    # nothing to read until the encoder has sorted that out. Larger word embeddings make every state
    # start out as its own word (plus context).
    with torch.no_grad():
        text_encoder.text_model.get_input_embeddings().weight.normal_(0.0, te.token_init_std)
    if te.intermediate is not None and te.intermediate != 4 * te.hidden:
        raise ValueError(f"text_encoder.intermediate={te.intermediate}: build_clip_text_encoder uses 4*hidden")
    torch.manual_seed(cfg.pretrain.seed + 1)
    unet = build_unet(
        cfg.resolution,
        3,
        3,
        cfg.unet.block_out_channels,
        cross_attention_dim=te.hidden,
        layers_per_block=cfg.unet.layers_per_block,
        attention_head_dim=cfg.unet.attention_head_dim,
        pooled_dim=te.hidden if cfg.unet.use_pooled else None,
        coord_channels=cfg.unet.coord_channels,
        cross_attention_levels=cfg.unet.cross_attention_levels,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.pretrain.num_train_timesteps,
        beta_schedule=cfg.pretrain.beta_schedule,
        prediction_type=cfg.pretrain.prediction_type,
    )
    return text_encoder, unet, scheduler


def compute_loss(
    images: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    text_encoder,
    unet,
    scheduler,
    gen: torch.Generator,
    min_snr_gamma: float = 0.0,
    min_snr_floor: float = 0.0,
    layout_loss_weight: float = 0.0,
    layout_cell: int = 4,
    high_noise_fraction: float = 0.0,
    high_noise_from: int = 0,
    high_noise_weight: float = 0.0,
    high_noise_text_grad: bool = True,
) -> torch.Tensor:
    """Diffusion MSE for one batch: images (B, 3, R, R), token ids / mask (B, 77).

    The target is the noise or v, as the scheduler's ``prediction_type`` says; ``min_snr_gamma`` > 0
    weights each image's loss by Min-SNR-gamma. ``layout_loss_weight`` > 0 adds that times the coarse
    layout loss (:func:`layout_loss`, v-prediction only) at every timestep. The first
    ``round(high_noise_fraction * B)`` images draw their timestep from ``[high_noise_from, T)`` (:func:`draw_timesteps`);
    ``high_noise_weight`` > 0 weights their loss by that in image space (the squared error of the predicted image,
    v-prediction only) instead of Min-SNR's ~SNR ~ 0, and ``high_noise_text_grad`` False keeps their gradient
    out of the text encoder (the UNet learns to read the words there; the encoder learns only from the rest).
    """
    from omnidiff.pipeline import min_snr_weights, predict_noise

    states, pooled = text_encoder(ids, mask)  # (B, 77, D), (B, D)
    n_high = round(high_noise_fraction * images.shape[0])
    if n_high and not high_noise_text_grad:
        high = (torch.arange(images.shape[0]) < n_high).to(states.device)  # (B,)
        states = torch.where(high[:, None, None], states.detach(), states)
        pooled = torch.where(high[:, None], pooled.detach(), pooled)
    noise = torch.randn(images.shape, generator=gen)  # (B, 3, R, R)
    t = draw_timesteps(images.shape[0], scheduler.config.num_train_timesteps, gen, high_noise_fraction,
                       high_noise_from)  # (B,)
    noisy = scheduler.add_noise(images, noise, t)
    # The pipeline's own conditioning call, so training and sampling cannot drift apart.
    pred = predict_noise(unet, noisy, t, states, pooled, mask)  # (B, 3, R, R)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(images, noise, t) if v_pred else noise  # (B, 3, R, R)
    per_image = ((pred - target) ** 2).mean(dim=(1, 2, 3))  # (B,)
    weights = min_snr_weights(scheduler, t, min_snr_gamma, min_snr_floor)  # (B,)
    if n_high and high_noise_weight > 0:
        if not v_pred:
            raise ValueError("high_noise_weight > 0 needs a v_prediction scheduler")
        # v error * sqrt(1 - alpha_bar) = the predicted image's error
        alpha_bar = scheduler.alphas_cumprod.to(t.device)[t[:n_high]]  # (n_high,)
        weights = torch.cat([high_noise_weight * (1 - alpha_bar), weights[n_high:]])
    loss = (per_image * weights).mean()
    if layout_loss_weight > 0:
        if not v_pred:
            raise ValueError("layout_loss_weight > 0 needs a v_prediction scheduler")
        loss = loss + layout_loss_weight * layout_loss(images, noisy, pred, t, scheduler, layout_cell).mean()
    return loss


def draw_timesteps(batch: int, num_train_timesteps: int, gen: torch.Generator, high_noise_fraction: float = 0.0,
                   high_noise_from: int = 0) -> torch.Tensor:
    """Training timesteps ``(batch,)``: uniform over ``[0, T)``, except the first ``round(high_noise_fraction * batch)``,
    uniform over ``[high_noise_from, T)``. With fraction 0 exactly the draws of plain uniform sampling."""
    t = torch.randint(0, num_train_timesteps, (batch,), generator=gen)
    n_high = round(high_noise_fraction * batch)
    if n_high:
        t[:n_high] = torch.randint(high_noise_from, num_train_timesteps, (n_high,), generator=gen)
    return t


def layout_loss(images: torch.Tensor, noisy: torch.Tensor, v_pred: torch.Tensor, t: torch.Tensor, scheduler,
                cell: int) -> torch.Tensor:
    """Per-image squared error ``(B,)`` of the coarse layout: the image predicted from ``v_pred``
    (x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v) and the true ``images``, both averaged over
    ``cell`` x ``cell`` pixel cells (a 16x16 image, cell 4: a 4x4 grid of mean colours).

    Issue 18 item 2: where the shape goes is decided at the noisiest steps, which Min-SNR weights by ~SNR ~ 0;
    weighting every pixel there (``min_snr_floor``) also trains the pixel detail that the noise makes
    unpredictable, whose large errors then drown the rest of the loss. The cell means of the true image are
    nearly fixed by the caption (a corner shape's jitter stays in its cells), so this term is mostly what the
    words can teach: where the colour goes.
    """
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x0 = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * v_pred  # (B, C, R, R)
    error = torch.nn.functional.avg_pool2d(x0 - images, cell)  # (B, C, R / cell, R / cell)
    return (error**2).mean(dim=(1, 2, 3))


def train(cfg: BaseConfig, images: torch.Tensor, captions: list[str]) -> dict:
    """The training loop. Returns {text_encoder, unet, scheduler, losses, wall_s, steps_per_s}."""
    p = cfg.pretrain
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    text_encoder, unet, scheduler = build_models(cfg)
    # Tokenise every caption once; "" is the unconditional caption (dropout, and CFG at sampling).
    all_ids, all_mask = text_encoder.tokenize(captions, max_windows=1)  # (N, 77), (N, 77)
    null_ids, null_mask = text_encoder.tokenize([""], max_windows=1)  # (1, 77)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    optimiser = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10% of lr
        if step < p.warmup_steps:
            return (step + 1) / p.warmup_steps
        progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    ema = [q.detach().clone() for q in params] if p.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(p.seed)
    text_encoder.train()
    unet.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    total = p.steps + p.high_noise_steps
    with Progress("pretrain", total=total, unit="step") as progress:
        for step in range(total):
            if step == p.steps:  # the layout phase (pretrain.high_noise_steps): a fresh optimiser, constant lr
                optimiser = torch.optim.AdamW(params, lr=p.high_noise_lr, weight_decay=p.weight_decay)
                schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / LAYOUT_WARMUP))
            if p.high_noise_steps:
                high = p.high_noise_fraction if step >= p.steps else 0.0
            else:
                high = p.high_noise_fraction if step >= p.high_noise_after else 0.0
            idx = torch.randint(0, len(images), (p.batch_size,), generator=gen)  # (B,)
            ids, mask = all_ids[idx].clone(), all_mask[idx].clone()
            drop = torch.rand(p.batch_size, generator=gen) < p.caption_dropout  # (B,)
            ids[drop], mask[drop] = null_ids, null_mask
            loss = compute_loss(images[idx], ids, mask, text_encoder, unet, scheduler, gen, p.min_snr_gamma,
                                p.min_snr_floor, p.layout_loss_weight, p.layout_cell, high, p.high_noise_from,
                                p.high_noise_weight, p.high_noise_text_grad)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
            optimiser.step()
            schedule.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - p.ema_decay)
            losses.append(loss.item())
            progress.update()
    wall_s = time.perf_counter() - t0
    if ema is not None:
        with torch.no_grad():
            for q, e in zip(params, ema, strict=True):
                q.copy_(e)
    text_encoder.eval()
    unet.eval()
    return {
        "text_encoder": text_encoder,
        "unet": unet,
        "scheduler": scheduler,
        "losses": losses,
        "wall_s": wall_s,
        "steps_per_s": total / wall_s if wall_s > 0 else float("nan"),
    }


# -- cache --------------------------------------------------------------------------------------
# Keys added after bases were cached and shipped: left out of the record while they hold a value that
# reproduces the old behaviour, so an unchanged config keeps its folder name (and its shipped copy).
# (section, key, is neutral(record), the keys that only matter when it is not)
_NEUTRAL_KEYS = (
    ("unet", "cross_attention_levels",
     lambda r: r["unet"].get("cross_attention_levels") in (None, len(r["unet"]["block_out_channels"]) - 1), ()),
    ("pretrain", "layout_loss_weight", lambda r: r["pretrain"].get("layout_loss_weight") == 0, ("layout_cell",)),
    ("pretrain", "high_noise_fraction", lambda r: r["pretrain"].get("high_noise_fraction") == 0,
     ("high_noise_from", "high_noise_weight", "high_noise_text_grad", "high_noise_after", "high_noise_steps",
      "high_noise_lr")),
)


def model_record(cfg: BaseConfig, pairs_digest: str) -> dict:
    """What determines the weights: the model and training parts of the config, the world's images and training
    pairs (``world.pairs_digest``: not its parallel texts or eval prompts, which pretraining never reads), the code
    version."""
    config = to_dict(cfg)
    record = {k: config[k] for k in ("resolution", "text_encoder", "unet", "pretrain")}
    for section, key, neutral, dependents in _NEUTRAL_KEYS:
        if neutral(record):
            for k in (key, *dependents):
                record[section].pop(k, None)
    return {"config": record, "pairs_digest": pairs_digest, "version": PRETRAIN_VERSION}


def base_hash(cfg: BaseConfig, pairs_digest: str) -> str:
    return hashlib.sha256(json.dumps(model_record(cfg, pairs_digest), sort_keys=True).encode()).hexdigest()[:16]


def base_dir(cfg: BaseConfig, world_dir: Path | None = None) -> Path:
    """Where the base model for ``cfg`` is (or will be) cached."""
    from omnidiff.world import world_pairs_digest

    world_dir = world_dir or resolve_world(cfg)
    return models_dir() / "base" / base_hash(cfg, world_pairs_digest(world_dir))


def is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / "base.json").is_file()


# -- the command --------------------------------------------------------------------------------
def build_pipeline(text_encoder, unet, scheduler):
    """The sampling pipeline (conditioning ``clip``) around trained models.

    The pipeline turns the DDPM training scheduler into its DPM-Solver++ sampler with thresholding on
    (NOTES.md sampling pitfall: without clamping the predicted image, the first step magnifies the
    model's error ~100x on a cosine schedule).
    """
    from omnidiff.pipeline import OmniDiffusionPipeline

    return OmniDiffusionPipeline(unet=unet, scheduler=scheduler, conditioning="clip", text_encoder=text_encoder)


def grid_prompts(world_dir: Path, n: int = GRID_PROMPTS) -> pd.DataFrame:
    """Short English eval prompts for the sample grid (the world's own held-out set)."""
    prompts = pd.read_parquet(world_dir / "eval_prompts.parquet")
    return prompts[(prompts["lang"] == "en") & (~prompts["is_long"])].head(n).reset_index(drop=True)


def pretrain(cfg: BaseConfig) -> Path:
    """Pretrain (or reuse) the base model for ``cfg``; returns the pipeline folder."""
    from omnidiff.world import load_world_meta, world_pairs_digest

    world_dir = resolve_world(cfg)
    digest = world_pairs_digest(world_dir)
    out_dir = models_dir() / "base" / base_hash(cfg, digest)
    if is_complete(out_dir) and not cfg.force:
        print(f"base model cached at {out_dir}")
        return out_dir
    if not cfg.force and _install_shipped(cfg, out_dir, digest, load_world_meta(world_dir)["digest"]):
        return out_dir
    images, captions = load_pairs(world_dir, cfg.resolution)
    print(f"pretraining the base model on {len(captions)} English pairs from {world_dir}")
    with _run(cfg) as run:
        result = train(cfg, images, captions)
        pipe = build_pipeline(result["text_encoder"], result["unet"], result["scheduler"])
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        meta = {
            "command": "omnidiff base pretrain --config <config.yaml>",
            "config": to_dict(cfg),
            "record": model_record(cfg, digest),
            "world_dir": str(world_dir),
            "world_digest": load_world_meta(world_dir)["digest"],
            "pairs": len(captions),
            "wall_s": result["wall_s"],
            "steps_per_s": result["steps_per_s"],
            "final_loss": float(np.mean(result["losses"][-50:])),
            "mlflow_run_id": run.info.run_id if run is not None else None,
        }
        (tmp / "base.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)  # a reader never sees a half-written folder
        print(
            f"base model: {cfg.pretrain.steps + cfg.pretrain.high_noise_steps} steps in {result['wall_s']:.0f}s "
            f"({result['steps_per_s']:.2f} step/s), final loss {meta['final_loss']:.4f} -> {out_dir}"
        )
        if run is not None:
            _log_pretrain(cfg, result, pipe, world_dir, out_dir, meta)
    return out_dir


def _install_shipped(cfg: BaseConfig, out_dir: Path, pairs_digest: str, world_digest: str) -> bool:
    """Install the repository's shipped copy of this exact base (omnidiff/base/shipped.py) instead of
    pretraining; False (and why, when other copies are shipped) when none matches."""
    from omnidiff.base import shipped

    manifest = shipped.install("base", out_dir.name, out_dir)
    if manifest is None:
        known = [m for m in shipped.others("base") if m.get("record")]
        if known:
            same_config = [m for m in known if m["record"].get("config") == model_record(cfg, pairs_digest)["config"]]
            why = (f"it was built on the world pairs {same_config[0]['record'].get('pairs_digest', '?')[:12]}, this "
                   f"world's are {pairs_digest[:12]}" if same_config else "the shipped ones were built from another config")
            print(f"no shipped base model matches {out_dir.name} ({why}); pretraining")
        return False
    print(f"base model: installed the shipped copy {out_dir.name} (sha256 verified; built at commit "
          f"{str(manifest.get('built_at_commit'))[:12]}; weights shipped {manifest.get('stored_dtype', 'as trained')}, installed as trained; "
          f"rebuild: `{manifest.get('rebuild')}`) -> {out_dir}")
    with _run(cfg) as run:
        if run is not None:
            import mlflow

            mlflow.set_tags({"base_dir": str(out_dir), "base_hash": out_dir.name, "world_digest": world_digest,
                             "pairs_digest": pairs_digest, "shipped": "true", "shipped_commit": str(manifest.get("built_at_commit"))})
    return True


def _log_pretrain(cfg: BaseConfig, result: dict, pipe, world_dir: Path, out_dir: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from omnidiff import tracking
    from omnidiff.scoring import generate_images, image_grids

    losses = result["losses"]
    for step in range(0, len(losses), max(1, len(losses) // 200)):
        mlflow.log_metric("loss", losses[step], step=step)
    mlflow.log_metrics(
        {"wall_s": result["wall_s"], "steps_per_s": result["steps_per_s"], "final_loss": meta["final_loss"]}
    )
    # base_hash = the folder's name (the digest of what determines its weights): flows/lineage.py finds this
    # run by it when a training names the base model only by its folder.
    mlflow.set_tags({"base_dir": str(out_dir), "base_hash": out_dir.name, "world_digest": meta["world_digest"],
                     "pairs_digest": meta["record"]["pairs_digest"]})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.5, label="step")
    window = max(1, len(losses) // 50)
    ax.plot(np.convolve(losses, np.ones(window) / window, mode="valid"), lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="noise-prediction MSE", yscale="log", title="base model pretraining")
    ax.legend()
    fig.tight_layout()
    tracking.log_figure(fig, "pretrain_loss.png")
    plt.close(fig)
    prompts = grid_prompts(world_dir)
    if len(prompts):
        s = cfg.sample
        generated = generate_images(
            pipe, prompts["prompt"].tolist(), s.seed, s.steps, s.guidance, s.batch_size, name="samples"
        )
        per_prompt = prompts.assign(length="<=77")
        grid = image_grids(per_prompt, generated, per_lang=GRID_PROMPTS)["en"]
        mlflow.log_image(grid, "samples_en.png")
        tracking.log_json({"prompts": prompts["prompt"].tolist()}, "samples_en_prompts.json")


@contextlib.contextmanager
def _run(cfg: BaseConfig):
    """An MLflow run when ``cfg.track`` (yields the run), else nothing (yields None)."""
    if not cfg.track:
        yield None
        return
    from omnidiff import tracking

    with tracking.start_run("base-pretrain", config=cfg) as run:
        yield run
