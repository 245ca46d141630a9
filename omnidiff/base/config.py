"""``BaseConfig`` (kind ``base``): the base text-to-image model, its evaluator and its scoring.

One file drives the three ``omnidiff base`` commands (configs/base.yaml):

    omnidiff base pretrain  --config configs/base.yaml [pretrain.steps=800 ...]
    omnidiff base evaluator --config configs/base.yaml
    omnidiff base score     --config configs/base.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from omnidiff.config import require


@dataclass(frozen=True)
class TextEncoderConfig:
    """The CLIP-style text encoder (English-only word vocabulary, one hard 77-token window).

    hidden: width of the transformer, and so the UNet's cross-attention dim.
    layers / heads: transformer depth and attention heads (hidden % heads == 0).
    intermediate: MLP width; None -> 4 * hidden.
    token_init_std: init std of the word embeddings (CLIP's own init is 0.02; 1.0 trains much faster here,
      see omnidiff/base/pretrain.py).
    """

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int | None = None
    token_init_std: float = 1.0

    def __post_init__(self) -> None:
        require(self.hidden >= 8, "text_encoder.hidden", self.hidden, "must be >= 8")
        require(self.layers >= 1, "text_encoder.layers", self.layers, "must be >= 1")
        require(
            self.heads >= 1 and self.hidden % self.heads == 0,
            "text_encoder.heads",
            self.heads,
            f"must divide text_encoder.hidden={self.hidden}",
        )
        require(self.token_init_std > 0, "text_encoder.token_init_std", self.token_init_std, "must be > 0")
        require(
            self.intermediate is None or self.intermediate >= 1,
            "text_encoder.intermediate",
            self.intermediate,
            "must be >= 1 or null",
        )


@dataclass(frozen=True)
class UNetConfig:
    """The pixel-space diffusers UNet2DConditionModel (NOTES.md sizing: 1.7M params at 16x16).

    block_out_channels: channels per resolution level; build_unet puts cross-attention in the lower ones.
    layers_per_block: resnet layers per level.
    attention_head_dim: channels per attention head.
    use_pooled: also condition on the text encoder's pooled embedding (SDXL-style ``text`` addition
      embedding); the adapter has a pooled head for exactly this (PAPER.md).
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    use_pooled: bool = True

    def __post_init__(self) -> None:
        require(
            len(self.block_out_channels) >= 2 and all(c >= 8 for c in self.block_out_channels),
            "unet.block_out_channels",
            self.block_out_channels,
            "need >= 2 levels of >= 8 channels",
        )
        require(self.layers_per_block >= 1, "unet.layers_per_block", self.layers_per_block, "must be >= 1")
        require(self.attention_head_dim >= 1, "unet.attention_head_dim", self.attention_head_dim, "must be >= 1")


@dataclass(frozen=True)
class PretrainConfig:
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
    seed: seeds init, batches, noise and timesteps; the same seed gives the same weights.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    ema_decay: float = 0.0
    min_snr_gamma: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.steps >= 1, "pretrain.steps", self.steps, "must be >= 1")
        require(self.batch_size >= 1, "pretrain.batch_size", self.batch_size, "must be >= 1")
        require(self.lr > 0, "pretrain.lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, "pretrain.weight_decay", self.weight_decay, "must be >= 0")
        require(self.warmup_steps >= 0, "pretrain.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.grad_clip > 0, "pretrain.grad_clip", self.grad_clip, "must be > 0")
        require(0 <= self.caption_dropout < 1, "pretrain.caption_dropout", self.caption_dropout, "must be in [0, 1)")
        require(
            self.num_train_timesteps >= 10, "pretrain.num_train_timesteps", self.num_train_timesteps, "must be >= 10"
        )
        require(0 <= self.ema_decay < 1, "pretrain.ema_decay", self.ema_decay, "must be in [0, 1)")
        require(self.min_snr_gamma >= 0, "pretrain.min_snr_gamma", self.min_snr_gamma, "must be >= 0 (0 disables)")


@dataclass(frozen=True)
class SampleConfig:
    """How the base model samples (sample grid at the end of pretraining, and scoring).

    steps: DPM-Solver++ steps; guidance: classifier-free guidance scale; seed: sampling seed;
    batch_size: images per pipeline call.
    """

    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(self.steps >= 1, "sample.steps", self.steps, "must be >= 1")
        require(self.guidance >= 0, "sample.guidance", self.guidance, "must be >= 0")
        require(self.batch_size >= 1, "sample.batch_size", self.batch_size, "must be >= 1")


@dataclass(frozen=True)
class EvaluatorConfig:
    """The attribute classifier that judges images (omnidiff/models/evaluator.py).

    Trained on fresh world renders at ``BaseConfig.resolution`` with random jitter and quality;
    ``heldout_fraction`` of the attribute combinations never appear in training and give the
    reported accuracy (``heldout_images`` renders of them).
    width / feature_dim: CNN width and penultimate feature size (the Fréchet features).
    train_images: size of the rendered training pool; steps / batch_size / lr: Adam training.
    """

    width: int = 32
    feature_dim: int = 128
    train_images: int = 24000
    heldout_images: int = 3000
    heldout_fraction: float = 0.15
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.width >= 4, "evaluator.width", self.width, "must be >= 4")
        require(self.feature_dim >= 2, "evaluator.feature_dim", self.feature_dim, "must be >= 2")
        require(self.train_images >= 10, "evaluator.train_images", self.train_images, "must be >= 10")
        require(self.heldout_images >= 10, "evaluator.heldout_images", self.heldout_images, "must be >= 10")
        require(
            0 < self.heldout_fraction < 0.5, "evaluator.heldout_fraction", self.heldout_fraction, "must be in (0, 0.5)"
        )
        require(self.steps >= 1, "evaluator.steps", self.steps, "must be >= 1")
        require(self.batch_size >= 2, "evaluator.batch_size", self.batch_size, "must be >= 2")
        require(self.lr > 0, "evaluator.lr", self.lr, "must be > 0")


@dataclass(frozen=True)
class ScoreConfig:
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
    max_per_group: int = 0
    images_per_prompt: int = 4
    langs: tuple[str, ...] = ()
    real_images: int = 1000
    out_dir: Path | None = None
    require_fit_evaluator: bool = True

    def __post_init__(self) -> None:
        require(self.max_per_group >= 0, "score.max_per_group", self.max_per_group, "must be >= 0")
        require(self.images_per_prompt >= 1, "score.images_per_prompt", self.images_per_prompt, "must be >= 1")
        require(self.real_images >= 2, "score.real_images", self.real_images, "must be >= 2")


@dataclass(frozen=True)
class BaseConfig:
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
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    threads: int = 0
    track: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        require(self.threads >= 0, "threads", self.threads, "must be >= 0")
        levels = len(self.unet.block_out_channels)
        require(
            self.resolution >= 8 and self.resolution % (2 ** (levels - 1)) == 0 and self.resolution % 4 == 0,
            "resolution",
            self.resolution,
            f"must be >= 8 and divisible by 4 and by 2**(levels-1)={2 ** (levels - 1)}",
        )
