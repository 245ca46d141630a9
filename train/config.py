"""``TrainConfig`` (kind ``train``): one frozen config for the three training stages.

    omnidiff train --config configs/train_stage1.yaml optim.lr=1e-3 dist.num_workers=2

The stages differ by configuration only (STYLE.md "What we take from them" 4): which modules
train, which data, which loss family. Loaded from YAML with dotted overrides (omnidiff.config);
the same object is the Prefect flow's parameter and what MLflow logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from omnidiff.config import require
from omnidiff.contracts.encoders import LLMSection  # one definition: the stage's llm section must match the embed run's


@dataclass(frozen=True)
class DataSection:
    """Which rows of the pair snapshot a stage trains on.

    snapshot: a pair snapshot: a name (newest of ``data/snapshots/<name>``) or a snapshot folder.
    cache_root: where ``<kind>/<fingerprint>/`` caches live; ``null`` = ``$OMNIDIFF_HOME/cache``.
    split: the snapshot split to train on.
    use_parallel: stage 1 also trains on the snapshot's parallel texts (translation -> English).
    clip_windows: stage 1 target: CLIP windows of 77 tokens stitched per English caption
      (the CLIP cache's ``max_windows``).
    aesthetic_min: keep pairs whose ``aesthetic`` score is >= this (stage 3's high-aesthetic subset);
      ``null`` keeps every pair.
    caption_dropout: stages 2-3: share of captions replaced by the cached "" embedding so that
      classifier-free guidance has an unconditional model to contrast with (PAPER.md weak points).
    empty_share: stage 1: share of training examples that align "" with CLIP's "" (the unconditional
      embedding classifier-free guidance contrasts with; the release never aligns it).
    val_examples: examples of the ``val`` split (same filters) whose loss is logged at the start and at
      every checkpoint, with fixed noise and timesteps so values are comparable (0 = off).
    """

    snapshot: str = "tiny"
    cache_root: Path | None = None
    split: str = "train"
    use_parallel: bool = True
    clip_windows: int = 3
    aesthetic_min: float | None = None
    caption_dropout: float = 0.1
    empty_share: float = 0.02
    val_examples: int = 32

    def __post_init__(self):
        require(bool(self.snapshot.strip()), "data.snapshot", self.snapshot, "name a snapshot (name or folder)")
        require(1 <= self.clip_windows <= 16, "data.clip_windows", self.clip_windows, "must be in 1..16")
        require(0 <= self.caption_dropout < 1, "data.caption_dropout", self.caption_dropout, "must be in [0, 1)")
        require(0 <= self.empty_share < 0.5, "data.empty_share", self.empty_share, "must be in [0, 0.5)")
        require(self.val_examples >= 0, "data.val_examples", self.val_examples, "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class AdapterSection:
    """The adapter's shape (PAPER.md "The parts"); its output width is the base UNet's cross-attention dim.

    width: inner width of the projection and the encoder-decoder.
    num_queries: fixed output length; 3 x 77 = 231 covers three stitched CLIP windows.
    encoder_layers / decoder_layers / heads / dropout: the small transformer.
    input_norm: standardise each LLM dimension with statistics of the training cache (taken when
      stage 1 starts; saved with the adapter). Off, Gemma's massive dimensions collapse the adapter.
    length_head: predict how many real CLIP tokens a caption has (stage 1 learns it from the CLIP
      windows; frozen after) and let the UNet cross-attend to that many queries only, as the base
      model was pretrained.
    pooled_query: the pooled embedding comes from one extra query (CLIP pools one <eos> state),
      not from the mean of the output tokens.
    max_positions: learned position embeddings for up to this many LLM tokens (0 = none; must be
      >= llm.max_length).
    """

    width: int = 128
    num_queries: int = 231
    encoder_layers: int = 1
    decoder_layers: int = 2
    heads: int = 4
    dropout: float = 0.0
    input_norm: bool = True
    length_head: bool = True
    pooled_query: bool = True
    max_positions: int = 512

    def __post_init__(self):
        require(self.width >= 8, "adapter.width", self.width, "must be >= 8")
        require(self.num_queries >= 1, "adapter.num_queries", self.num_queries, "must be >= 1")
        require(self.heads >= 1 and self.width % self.heads == 0, "adapter.heads", self.heads,
                f"must divide adapter.width={self.width}")
        require(self.encoder_layers >= 0, "adapter.encoder_layers", self.encoder_layers, "must be >= 0")
        require(self.decoder_layers >= 1, "adapter.decoder_layers", self.decoder_layers, "must be >= 1")
        require(0 <= self.dropout < 1, "adapter.dropout", self.dropout, "must be in [0, 1)")
        require(self.max_positions >= 0, "adapter.max_positions", self.max_positions, "must be >= 0 (0 = none)")


@dataclass(frozen=True)
class OptimSection:
    """torch AdamW (DeepSpeed ``torch_adam``: the fused/CPU Adam ops compile for minutes, NOTES.md).

    lr / weight_decay / betas / eps: AdamW. warmup_steps: linear warm-up from 0.
    schedule: after warm-up ``constant``, ``linear`` decay to 0, or ``cosine`` decay to 0 at ``max_steps``.
    grad_clip: global gradient-norm clip (0 disables).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float = 1.0

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "each must be in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")


@dataclass(frozen=True)
class DistSection:
    """How the job spreads: Ray Train workers, each one DeepSpeed rank.

    launcher: ``ray`` = a Ray Train ``TorchTrainer`` job of ``num_workers`` (the cluster from
      ``RAY_ADDRESS``, else a private local Ray); ``local`` = one rank in this process (debugging,
      benchmarks, quick tests; the same loop, no Ray).
    num_workers / cpus_per_worker / use_gpu: Ray Train's scaling config (gloo on CPU, nccl on GPU).
    zero_stage: DeepSpeed ZeRO stage 0-3.
    precision: ``fp32``; ``bf16``/``fp16`` for GPUs (fp16 uses DeepSpeed's loss scaling).
    max_failures: Ray Train restarts of a failed worker group (each resumes from the latest checkpoint).
    """

    launcher: Literal["ray", "local"] = "ray"
    num_workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_failures: int = 0

    def __post_init__(self):
        require(self.num_workers >= 1, "dist.num_workers", self.num_workers, "must be >= 1")
        require(self.launcher == "ray" or self.num_workers == 1, "dist.num_workers", self.num_workers,
                "launcher 'local' runs exactly one rank; use launcher 'ray' for more")
        require(self.cpus_per_worker >= 1, "dist.cpus_per_worker", self.cpus_per_worker, "must be >= 1")
        require(self.zero_stage in (0, 1, 2, 3), "dist.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        require(self.max_failures >= 0, "dist.max_failures", self.max_failures, "must be >= 0")


@dataclass(frozen=True)
class CheckpointSection:
    """DeepSpeed checkpoints for resume (the export is separate).

    dir: checkpoint folder; ``null`` = ``$OMNIDIFF_HOME/checkpoints/<name>``.
    every_steps: save every N optimizer steps (and always at the end).
    keep: how many recent checkpoints to keep.
    resume: ``auto`` continues from the folder's latest checkpoint when there is one; ``never``
      refuses a folder that already holds checkpoints (pick another ``name`` or delete it).
    """

    dir: Path | None = None
    every_steps: int = 100
    keep: int = 2
    resume: Literal["auto", "never"] = "auto"

    def __post_init__(self):
        require(self.every_steps >= 1, "checkpoint.every_steps", self.every_steps, "must be >= 1")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass(frozen=True)
class SamplesSection:
    """Sample grids logged to MLflow: a fixed prompt set from the snapshot's val split.

    per_group: prompts per (language, short/long) group; long = more LLM tokens than one CLIP window.
    every_steps: also log a grid every N steps (0 = only at the end).
    steps / guidance_scale / seed: DPM-Solver++ sampling of the grid.
    """

    per_group: int = 1
    every_steps: int = 0
    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0

    def __post_init__(self):
        require(self.per_group >= 0, "samples.per_group", self.per_group, "must be >= 0 (0 = no grids)")
        require(self.every_steps >= 0, "samples.every_steps", self.every_steps, "must be >= 0")
        require(self.steps >= 1, "samples.steps", self.steps, "must be >= 1")
        require(self.guidance_scale >= 0, "samples.guidance_scale", self.guidance_scale, "must be >= 0")


@dataclass(frozen=True)
class RegistrySection:
    """Export + MLflow registry.

    export_dir: pipeline folder to write; ``null`` = ``$OMNIDIFF_HOME/exports/<name>``.
    register: register the export as a version of ``model_name`` and point ``alias`` at it.
    stage_alias: also point ``stage<N>`` at it (what the next stage's ``init_from`` can name).
    """

    export_dir: Path | None = None
    register: bool = True
    model_name: str = "omnidiff-tiny"
    alias: str = "candidate"
    stage_alias: bool = True

    def __post_init__(self):
        require(bool(self.model_name.strip()), "registry.model_name", self.model_name, "must not be empty")
        require(bool(self.alias.strip()), "registry.alias", self.alias, "must not be empty")


UNET_PARTS = ("none", "all", "attention", "cross_attention")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage (PAPER.md "The three stages"; DESIGN.md "train").

    stage: 1 alignment (adapter only, loss against cached CLIP states), 2 end to end (noise
      prediction on cached pixels), 3 high-aesthetic fine-tune (stage 2's loss on the subset with
      ``data.aesthetic_min``).
    name: run name: the checkpoint folder, MLflow run name and export folder name.
    base_model: the existing text-to-image model's pipeline folder (conditioning ``clip``), or a
      registry reference ``name@alias`` / ``name/version``. Its UNet is the stage-2 starting point and
      its text encoder named the stage-1 targets.
    init_from: the parent stage's export (folder or registry reference): stage 2 takes its adapter,
      stage 3 its adapter and UNet. ``null`` starts the adapter fresh (stage 1).
    train_adapter: whether the adapter trains (stage 3: the paper freezes it, the release trains it).
    train_unet: which UNet parameters train: ``none``, ``all``, ``attention`` (every attention block)
      or ``cross_attention`` (the attn2 blocks that read the text).
    loss: stage 1 token loss: ``cosine`` = 1 - cosine per token + ``norm_weight`` x a norm-matching
      term (the release's default), or ``mse``.
    min_snr_gamma: stages 2-3: Min-SNR-gamma loss weighting (0 = plain MSE), as the base model was
      pretrained (configs/base.yaml: without it colour was never learned).
    match: stage 1: which query answers which CLIP token: ``position`` (query i answers position i, the
      release) or ``set`` (a one-to-one matching per caption; the UNet reads text tokens as a set).
    length_weight: stage 1 weight of the length head's loss (squared error of the log token count;
      only with ``adapter.length_head``).
    distill_weight: stage 1 weight of an output-matching term (ours, not the paper's): the frozen
      base UNet, on a noised training image, should predict the same noise conditioned on the
      adapter's output as on CLIP's states of the English side. Token cosine weighs every CLIP
      token alike; this weighs them as the UNet reads them (colour words, not "a"). 0 = off.
    micro_batch_size: examples per rank per forward; global_batch_size: examples per optimizer step
      (= micro x gradient accumulation x workers).
    max_steps: optimizer steps.
    ema_decay: keep an EMA of the trained weights, exported instead of the raw ones (0 = off).
    log_every: steps between loss lines / MLflow metric points.
    seed: model init, data order, noise and dropout; a run is a function of (config, seed).
    track: log the run to MLflow (``MLFLOW_TRACKING_URI``, else a local store under home).
    """

    kind: ClassVar[str] = "train"

    stage: int = 1
    name: str = "stage1"
    base_model: str = ""
    init_from: str | None = None
    llm: LLMSection = field(default_factory=LLMSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train_adapter: bool = True
    train_unet: Literal["none", "all", "attention", "cross_attention"] = "none"
    loss: Literal["cosine", "mse"] = "cosine"
    norm_weight: float = 0.1
    length_weight: float = 0.1
    match: Literal["position", "set"] = "set"
    distill_weight: float = 0.0
    min_snr_gamma: float = 5.0
    optim: OptimSection = field(default_factory=OptimSection)
    micro_batch_size: int = 32
    global_batch_size: int = 32
    max_steps: int = 100
    ema_decay: float = 0.0
    dist: DistSection = field(default_factory=DistSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    log_every: int = 10
    seed: int = 0
    track: bool = True

    def __post_init__(self):
        require(self.stage in (1, 2, 3), "stage", self.stage, "must be 1 (align), 2 (end to end) or 3 (aesthetic)")
        require(bool(self.name.strip()) and "/" not in self.name and not self.name.startswith("."), "name",
                self.name, "a plain folder name (no '/', not hidden)")
        require(bool(self.base_model.strip()), "base_model", self.base_model,
                "name the base model: its pipeline folder or a registry reference (name@alias)")
        require(self.stage == 1 or self.init_from is not None, "init_from", self.init_from,
                f"stage {self.stage} starts from the previous stage's export (folder or name@alias)")
        require(self.stage != 1 or self.train_unet == "none", "train_unet", self.train_unet,
                "stage 1 trains the adapter only (PAPER.md); use 'none'")
        require(self.stage != 1 or self.train_adapter, "train_adapter", self.train_adapter,
                "stage 1 trains the adapter; it cannot be frozen")
        require(self.train_adapter or self.train_unet != "none", "train_unet", self.train_unet,
                "nothing would train: set train_adapter true or train some of the UNet")
        require(self.stage != 3 or self.data.aesthetic_min is not None, "data.aesthetic_min",
                self.data.aesthetic_min, "stage 3 trains on the high-aesthetic subset: set a threshold")
        require(self.norm_weight >= 0, "norm_weight", self.norm_weight, "must be >= 0")
        require(self.min_snr_gamma >= 0, "min_snr_gamma", self.min_snr_gamma, "must be >= 0 (0 = off)")
        require(self.length_weight >= 0, "length_weight", self.length_weight, "must be >= 0")
        require(self.distill_weight >= 0, "distill_weight", self.distill_weight, "must be >= 0 (0 = off)")
        require(self.distill_weight == 0 or self.stage == 1, "distill_weight", self.distill_weight,
                "the output-matching term is stage 1's (stages 2-3 train on images with the diffusion loss)")
        require(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "must be >= 1")
        per_step = self.micro_batch_size * self.dist.num_workers
        require(self.global_batch_size % per_step == 0, "global_batch_size", self.global_batch_size,
                f"must be a multiple of micro_batch_size x dist.num_workers = {per_step}")
        require(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in [0, 1) (0 = off)")
        require(self.ema_decay == 0 or self.dist.zero_stage < 3, "ema_decay", self.ema_decay,
                "EMA needs whole parameters on every rank: use dist.zero_stage <= 2")
        require(self.track or not self.registry.register, "registry.register", self.registry.register,
                "registering needs an MLflow run: set track true, or registry.register false")
        require(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        require(self.optim.warmup_steps <= self.max_steps, "optim.warmup_steps", self.optim.warmup_steps,
                f"longer than the run (max_steps={self.max_steps})")
        require(self.adapter.max_positions == 0 or self.adapter.max_positions >= self.llm.max_length,
                "adapter.max_positions", self.adapter.max_positions,
                f"must cover llm.max_length={self.llm.max_length} tokens (or 0 = no position embeddings)")
        require(self.adapter.num_queries >= 77 * self.data.clip_windows or self.stage != 1, "adapter.num_queries",
                self.adapter.num_queries,
                f"stage 1 aligns query i with CLIP token i: needs >= 77 x data.clip_windows = {77 * self.data.clip_windows}")

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.dist.num_workers)

    @property
    def family(self) -> str:
        """The loss family: ``align`` (stage 1) or ``diffusion`` (stages 2-3)."""
        return "align" if self.stage == 1 else "diffusion"
