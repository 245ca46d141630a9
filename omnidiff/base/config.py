"""``BaseConfig`` (kind ``base``): the base text-to-image model, its evaluator and its scoring.

One file drives the three ``omnidiff base`` commands (configs/base.yaml):

    omnidiff base pretrain  --config configs/base.yaml [pretrain.steps=800 ...]
    omnidiff base evaluator --config configs/base.yaml
    omnidiff base score     --config configs/base.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from omnidiff.config import ConfigModel, require


class TextEncoderConfig(ConfigModel):
    """The CLIP-style text encoder (English-only word vocabulary, one hard 77-token window).

    hidden: width of the transformer, and so the UNet's cross-attention dim.
    layers / heads: transformer depth and attention heads (hidden % heads == 0).
    intermediate: MLP width; None -> 4 * hidden.
    token_init_std: init std of the word embeddings (CLIP's own init is 0.02; 1.0 trains much faster here,
      see omnidiff/base/pretrain.py).
    """

    hidden: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate: int | None = Field(None, ge=1)
    token_init_std: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TextEncoderConfig:
        require(self.hidden % self.heads == 0, "heads", self.heads, f"must divide text_encoder.hidden={self.hidden}")
        return self


class UNetConfig(ConfigModel):
    """The pixel-space diffusers UNet2DConditionModel (NOTES.md sizing: 1.7M params at 16x16).

    block_out_channels: channels per resolution level; build_unet puts cross-attention in the lower ones.
    layers_per_block: resnet layers per level.
    attention_head_dim: channels per attention head.
    use_pooled: also condition on the text encoder's pooled embedding (SDXL-style ``text`` addition
      embedding); the adapter has a pooled head for exactly this (PAPER.md).
    coord_channels: feed the pixel coordinates (y, x) as two extra input channels (CoordConv), so the UNet
      knows where each pixel is and can draw "in the top left corner" there; without them it drew a
      corner shape in whichever corner the noise suggested (omnidiff/models/unet.py, issue 18).
    cross_attention_levels: how many of the lowest-resolution levels get cross-attention (the mid block always
      has it); None = all but the full-resolution one (build_unet's default), len(block_out_channels) = all.
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    use_pooled: bool = True
    coord_channels: bool = False
    cross_attention_levels: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _levels(self) -> UNetConfig:
        require(len(self.block_out_channels) >= 2 and all(c >= 8 for c in self.block_out_channels),
                "block_out_channels", self.block_out_channels, "need >= 2 levels of >= 8 channels")
        levels = len(self.block_out_channels)
        require(self.cross_attention_levels is None or self.cross_attention_levels <= levels,
                "cross_attention_levels", self.cross_attention_levels,
                f"must be at most the number of levels, len(block_out_channels)={levels}")
        return self


class PretrainConfig(ConfigModel):
    """Joint training of text encoder + UNet by noise prediction on the world's English captions.

    steps / batch_size: optimiser steps and images per step.
    lr / weight_decay / warmup_steps / grad_clip: AdamW with linear warm-up then cosine decay.
    caption_dropout: share of captions replaced by "" so classifier-free guidance works.
    num_train_timesteps / beta_schedule: the DDPM noise schedule (squaredcos_cap_v2 = cosine).
    prediction_type: what the UNet predicts, the noise (epsilon) or v = alpha*noise - sigma*image;
      saved in the scheduler config, which the pipeline's sampler and stages 2-3 read.
    ema_decay: EMA of the weights that get saved (0 disables).
    min_snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023; 0 disables): the noise-prediction
      loss of step t is weighted by min(SNR(t), gamma) / SNR(t), so the nearly clean steps (pixel
      detail) stop drowning out the noisy ones, where what the caption asks for is decided.
    min_snr_floor: also clamp SNR from below (image-space weight clamp(SNR, floor, gamma)); 0 = plain
      Min-SNR, which weights the noisiest steps by ~SNR ~ 0, and those decide where the shape goes.
    layout_loss_weight: weight of an extra loss on the coarse layout (0 disables; v-prediction only): the
      squared error of the predicted image (x0), both averaged over ``layout_cell`` x ``layout_cell`` pixel
      cells, weighted the same at every timestep. A floor on the low frequencies only: at the noisiest steps
      it trains where the shape goes (what the words decide) without the pixel detail that cannot be
      predicted there, which is what made ``min_snr_floor`` swamp the rest of the loss.
    layout_cell: side in pixels of the cells the layout loss averages over (must divide the resolution).
    high_noise_fraction / high_noise_from: that share of every batch draws its timestep uniformly from
      [high_noise_from, num_train_timesteps) instead of from all of them (0 = plain uniform draws): more
      examples of the noisiest steps, where the words alone decide the layout.
    high_noise_weight: > 0: that share's loss is the predicted image's squared error times this (an image-space
      weight, v-prediction only) instead of its Min-SNR weight (~SNR ~ 0 there); 0 = Min-SNR for it too.
    high_noise_text_grad: false keeps that share's gradient out of the text encoder (it learns from the rest).
    high_noise_after: the share starts at this step (before it, every draw is uniform): a curriculum that
      first learns what the words say, then where (used only when high_noise_steps is 0).
    high_noise_steps / high_noise_lr: > 0: the share is drawn only in that many extra steps after ``steps`` (a
      layout phase: a fresh AdamW at the constant lr ``high_noise_lr`` after a 20-step warm-up), so the first
      ``steps`` train exactly as without it.
    seed: seeds init, batches, noise and timesteps; the same seed gives the same weights.
    """

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    ema_decay: float = Field(0.0, ge=0, lt=1)
    min_snr_gamma: float = Field(5.0, ge=0)
    min_snr_floor: float = Field(0.0, ge=0)
    layout_loss_weight: float = Field(0.0, ge=0)
    layout_cell: int = Field(4, ge=1)
    high_noise_fraction: float = Field(0.0, ge=0, le=1)
    high_noise_from: int = Field(850, ge=0)
    high_noise_weight: float = Field(0.0, ge=0)
    high_noise_text_grad: bool = True
    high_noise_after: int = Field(0, ge=0)
    high_noise_steps: int = Field(0, ge=0)
    high_noise_lr: float = Field(5e-4, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _floor_under_gamma(self) -> PretrainConfig:
        require(self.min_snr_floor <= self.min_snr_gamma, "min_snr_floor", self.min_snr_floor,
                f"must not exceed pretrain.min_snr_gamma={self.min_snr_gamma}")
        require(self.layout_loss_weight == 0 or self.prediction_type == "v_prediction", "layout_loss_weight",
                self.layout_loss_weight, "needs prediction_type v_prediction (the image predicted from the noise "
                "target divides by sqrt(alpha_bar), ~0 at the noisiest steps)")
        require(self.high_noise_fraction == 0 or self.high_noise_from < self.num_train_timesteps, "high_noise_from",
                self.high_noise_from, f"must be below num_train_timesteps={self.num_train_timesteps}")
        require(self.high_noise_weight == 0 or self.prediction_type == "v_prediction", "high_noise_weight",
                self.high_noise_weight, "needs prediction_type v_prediction (an image-space weight)")
        require(self.high_noise_fraction == 0 or self.high_noise_after < self.steps, "high_noise_after",
                self.high_noise_after, f"must be below steps={self.steps}, or the share never starts")
        require(self.high_noise_steps == 0 or self.high_noise_fraction > 0, "high_noise_steps", self.high_noise_steps,
                "needs high_noise_fraction > 0 (the phase trains the high-noise share)")
        return self


class SampleConfig(ConfigModel):
    """How the base model samples (sample grid at the end of pretraining, and scoring).

    steps: DPM-Solver++ steps; guidance: classifier-free guidance scale; seed: sampling seed;
    batch_size: images per pipeline call.
    """

    steps: int = Field(20, ge=1)
    guidance: float = Field(3.0, ge=0)
    seed: int = 0
    batch_size: int = Field(64, ge=1)


class EvaluatorConfig(ConfigModel):
    """The attribute classifier that judges images (omnidiff/models/evaluator.py).

    Trained on fresh world renders at ``BaseConfig.resolution`` with random jitter and quality;
    ``heldout_fraction`` of the attribute combinations never appear in training and give the
    reported accuracy (``heldout_images`` renders of them).
    width / feature_dim: CNN width and penultimate feature size (the Fréchet features).
    train_images: size of the rendered training pool; steps / batch_size / lr: Adam training.
    """

    width: int = Field(32, ge=4)
    feature_dim: int = Field(128, ge=2)
    train_images: int = Field(24000, ge=10)
    heldout_images: int = Field(3000, ge=10)
    heldout_fraction: float = Field(0.15, gt=0, lt=0.5)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


class ScoreConfig(ConfigModel):
    """``omnidiff base score``: prompt faithfulness of a model on the world's eval prompts.

    model: a pipeline folder (or registry ref); None -> the base model this config pretrains.
    max_per_group: at most this many prompts per (lang, length) group (0 = all), chosen by seed.
    images_per_prompt: images drawn per prompt (each with its own seed): more images, tighter numbers.
    langs: only these languages (empty = all).
    real_images: world images used as the "real" side of the Fréchet distance.
    out_dir: where per_prompt.parquet, summary.csv and grids go; None -> home()/reports/base_score/<model hash>.
    require_fit_evaluator: refuse to score with an evaluator below 95% held-out accuracy (issue 2);
      false only for smoke tests, and the report then says ``evaluator_fit: false``.
    """

    model: str | None = None
    max_per_group: int = Field(0, ge=0)
    images_per_prompt: int = Field(4, ge=1)
    langs: tuple[str, ...] = ()
    real_images: int = Field(1000, ge=2)
    out_dir: Path | None = None
    require_fit_evaluator: bool = True


class BaseConfig(ConfigModel):
    """The base model ("the existing model", Stable Diffusion's part) on the tiny world.

    world_config: the world's YAML (generated once and reused; its digest is part of the cache key).
    world_dir: use this already generated world folder instead (tests: the ``tiny_world`` fixture).
    resolution: pixel-space image side the UNet and the evaluator work at (world images are resized).
    threads: torch intra-op threads for every command (0 = torch's default). On a shared, busy
      machine 1 is several times faster than 2 (threads wait on each other). Not part of the
      cache key (results may differ in the last bits between thread counts).
    track: log to MLflow (the running stack's server, else a local store under OMNIDIFF_HOME).
    force: retrain even when the cached folder exists.
    """

    kind: ClassVar[str] = "base"

    world_config: Path = Path("configs/world.yaml")
    world_dir: Path | None = None
    resolution: int = 16
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    threads: int = Field(0, ge=0)
    track: bool = True
    force: bool = False

    @model_validator(mode="after")
    def _resolution_fits_the_unet(self) -> BaseConfig:
        levels = len(self.unet.block_out_channels)
        require(
            self.resolution >= 8 and self.resolution % (2 ** (levels - 1)) == 0 and self.resolution % 4 == 0,
            "resolution",
            self.resolution,
            f"must be >= 8 and divisible by 4 and by 2**(levels-1)={2 ** (levels - 1)}",
        )
        p = self.pretrain
        require(p.layout_loss_weight == 0 or self.resolution % p.layout_cell == 0, "pretrain.layout_cell",
                p.layout_cell, f"must divide resolution={self.resolution}")
        return self
