"""``TrainConfig`` (kind ``train``): one frozen config for the three training stages.

    omnidiff train --config configs/train_stage1.yaml optim.lr=1e-3 dist.num_workers=2

The stages differ by configuration only (STYLE.md "What we take from them" 4): which modules
train, which data, which loss family. Loaded from YAML with dotted overrides (omnidiff.config);
the same object is the Prefect flow's parameter and what MLflow logs.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from omnidiff.config import ConfigModel, NonBlank, require
from omnidiff.contracts.encoders import LLMSection  # one definition: the stage's llm section must match the embed run's
from omnidiff.contracts.storage import Location, StorageSection


class DataSection(ConfigModel):
    """Which rows of the pair snapshot a stage trains on.

    snapshot: a pair snapshot: a name (newest of ``<snapshot_root>/<name>``) or a snapshot folder / URL.
    snapshot_root: where named snapshots are looked up; ``null`` = ``<storage.root>/data/snapshots``, else
      ``$OMNIDIFF_HOME/data/snapshots``.
    cache_root: where ``<kind>/<fingerprint>/`` caches live; ``null`` = ``<storage.root>/cache``, else
      ``$OMNIDIFF_HOME/cache``.
    split: the snapshot split to train on.
    aesthetic_min: keep pairs whose ``aesthetic`` score is >= this (stage 3's high-aesthetic subset);
      ``null`` keeps every pair.
    val_examples: examples of the ``val`` split (same filters) whose loss is logged at the start and at
      every checkpoint, with fixed noise and timesteps so values are comparable (0 = off).
    max_resident_shards: decoded cache shards a training rank keeps per cache (least recently used
      out first); a rank's memory is bounded by it, not by the corpus (train.data, issue 17).
    order_window_rows: the order's shuffle window, in examples (docs/architecture.md "Training data"). A
      split with at most this many examples is visited in a fresh permutation of all its examples each
      epoch, as before this option; a larger one in a block shuffle: examples sorted by where their LLM
      states are cached, cut into blocks of order_block_rows, blocks permuted, rows permuted within
      windows of this many examples. Keep it within what a rank keeps decoded of the LLM cache
      (max_resident_shards x its largest shard's rows: 16384 with the embed defaults; a warning says
      when it is not): then an LLM row group is decoded about once per window and a batch costs the
      same at any corpus size. A checkpoint records the order; resuming under another one is refused.
    order_block_rows: examples per block of the block shuffle (consecutive in the LLM cache, whole 32-row
      Parquet row groups: about two). Smaller mixes more, larger reads fewer groups per window.
    order_lanes: the block shuffle visits each window in this many lanes (every lane-th block of the window, one
      after another, the lanes merged at one rate), so any stretch of positions draws from about this many blocks
      at once: a run's first steps decode the row groups of order_lanes blocks, not of the whole window's
      (window / block_rows) blocks. 0: each window permuted whole (the order before this option).
    micro_by_length: deal each step's examples to its micro-batches (over ranks and accumulation steps) by their
      LLM token count: the step's global_batch_size positions sorted by (length, position), each micro-batch a
      consecutive slice of them, so a step's short captions are not padded to its longest (the adapter's attention
      runs over the padded length). The same examples per step, the same example at each position and the same
      micro-batches on any worker count with the same micro_batch_size; only which micro-batch of the step a
      sample lands in changes. A checkpoint records it; resuming under the other setting is refused (false: the
      consecutive micro-batches of runs before this option).
    prefetch: decode the next micro-batches' row groups in a background thread while the model computes
      (the batches are the same either way; off: decoded when the batch is built).
    prefetch_batches: how many micro-batches ahead the background thread decodes (with prefetch on): more
      keeps it busy through the steps whose batches are all resident, so a burst of first decodes (a run's
      start, a new window) overlaps several steps' compute. Keep it x micro_batch_size within the resident
      budget (max_resident_shards x a shard's rows), or groups decoded ahead are evicted before their batch.
    """

    snapshot: NonBlank = "tiny"
    snapshot_root: Location | None = None
    cache_root: Location | None = None
    split: str = "train"
    aesthetic_min: float | None = None
    val_examples: int = Field(32, ge=0)
    max_resident_shards: int = Field(8, ge=1)
    order_window_rows: int = Field(8192, ge=1)
    order_block_rows: int = Field(64, ge=1)
    order_lanes: int = Field(16, ge=0)
    micro_by_length: bool = True
    prefetch: bool = True
    prefetch_batches: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _window_holds_blocks(self) -> DataSection:
        require(self.order_window_rows >= self.order_block_rows, "order_window_rows", self.order_window_rows,
                f"must be >= data.order_block_rows={self.order_block_rows} (a window holds whole blocks)")
        return self


class AdapterSection(ConfigModel):
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
    """

    width: int = Field(128, ge=8)
    num_queries: int = Field(231, ge=1)
    encoder_layers: int = Field(1, ge=0)
    decoder_layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    input_norm: bool = True
    length_head: bool = True
    pooled_query: bool = True

    @model_validator(mode="after")
    def _heads_divide_width(self) -> AdapterSection:
        require(self.width % self.heads == 0, "heads", self.heads, f"must divide adapter.width={self.width}")
        return self


class AlignSection(ConfigModel):
    """``align:``, stage 1's options: the adapter alone learns the base model's CLIP states of the
    English side (PAPER.md "The three stages" 1). Stage 1 needs this section (``align: {}`` for the
    defaults); stages 2-3 refuse it.

    use_parallel: also train on the snapshot's parallel texts (translation -> English). Off, stage 1 still
      reads every language's captions (each aligned with its English side); ``langs`` restricts that.
    langs: only examples (captions and parallel texts) in these languages; empty = all. ``[en]`` is
      stage 1 on English alone, as MuLan aligns (issue 18's ablation, benchmarks/zero_shot_ablation.py).
    clip_windows: the target: CLIP windows of 77 tokens stitched per English caption (the CLIP
      cache's ``max_windows``).
    empty_share: share of training examples that align "" with CLIP's "" (the unconditional
      embedding classifier-free guidance contrasts with; the release never aligns it).
    norm_weight: the token loss is 1 - cosine per token + ``norm_weight`` x a norm-matching term
      (the release's loss). Each CLIP token is answered by one of the first n queries, matched one
      to one per caption (the UNet reads its text tokens as a set).
    length_weight: weight of the length head's loss (squared error of the log token count; only
      with ``adapter.length_head``).
    min_distinct_targets: stage 1 refuses to start when fewer than this share of the training's
      distinct English texts have a distinct CLIP target (the tiny base's word tokenizer turns
      another data set's words into ``<unk>``, so its captions share one target and nothing can be
      learned); 0 turns the check off.
    allow_collapsed_targets: start anyway, with a warning, when the targets collapse.
    """

    use_parallel: bool = True
    langs: tuple[NonBlank, ...] = ()
    clip_windows: int = Field(3, ge=1, le=16)
    empty_share: float = Field(0.02, ge=0, lt=0.5)
    norm_weight: float = Field(0.1, ge=0)
    length_weight: float = Field(0.1, ge=0)
    min_distinct_targets: float = Field(0.5, ge=0, le=1)
    allow_collapsed_targets: bool = False


class DiffusionSection(ConfigModel):
    """``diffusion:``, stages 2-3's options: noise prediction on cached pixels (or latents) with the
    adapter and the base model's UNet. Stages 2-3 need this section; stage 1 refuses it.

    train_adapter: whether the adapter trains (stage 3: the paper freezes it, the release trains it).
    train_unet: which UNet parameters train: ``none``, ``all``, ``attention`` (every attention block)
      or ``cross_attention`` (the attn2 blocks that read the text).
    caption_dropout: share of captions replaced by the cached "" embedding so that classifier-free
      guidance has an unconditional model to contrast with (PAPER.md weak points).
    min_snr_gamma: Min-SNR-gamma loss weighting (0 = plain MSE), as the base model was pretrained
      (configs/base.yaml: without it colour was never learned).
    gradient_checkpointing: recompute the UNet's activations in the backward pass
      (``unet.enable_gradient_checkpointing()``): an SD/SDXL UNet at 512-1024 px then fits a GPU's
      memory at a useful micro-batch, for about a third more compute per step.
    adapter_lr_scale: the adapter's learning rate as a share of ``optim.lr`` (its own AdamW param group,
      the same schedule): below 1 the adapter moves less from what stage 1 taught it (phrasings only the
      stage-1 texts hold) while the UNet trains at the full rate. 1 = one group, as before.
    """

    train_adapter: bool = True
    train_unet: Literal["none", "all", "attention", "cross_attention"] = "all"
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    min_snr_gamma: float = Field(5.0, ge=0)
    gradient_checkpointing: bool = False
    adapter_lr_scale: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _something_trains(self) -> DiffusionSection:
        require(self.train_adapter or self.train_unet != "none", "train_unet", self.train_unet,
                "nothing would train: set train_adapter true or train some of the UNet")
        return self


class OptimSection(ConfigModel):
    """torch AdamW (DeepSpeed ``torch_adam``: the fused/CPU Adam ops compile for minutes, NOTES.md).

    lr / weight_decay / betas / eps: AdamW. warmup_steps: linear warm-up from 0.
    schedule: after warm-up ``constant``, ``linear`` decay to 0, or ``cosine`` decay to 0 at ``max_steps``.
    grad_clip: global gradient-norm clip (0 disables).
    """

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _betas(self) -> OptimSection:
        require(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "each must be in [0, 1)")
        return self


class DistSection(ConfigModel):
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
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_failures: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _local_is_one_rank(self) -> DistSection:
        require(self.launcher == "ray" or self.num_workers == 1, "num_workers", self.num_workers,
                "launcher 'local' runs exactly one rank; use launcher 'ray' for more")
        return self


class CheckpointSection(ConfigModel):
    """DeepSpeed checkpoints for resume (the export is separate).

    dir: checkpoint folder or ``s3://`` prefix; ``null`` = ``<storage.root>/checkpoints/<name>``, else
      ``$OMNIDIFF_HOME/checkpoints/<name>``. On object storage each rank works in a local folder (a cache
      under ``$OMNIDIFF_HOME/checkpoint_cache/``) and every checkpoint is uploaded with its manifest last
      (train/checkpoint.py).
    every_steps: save every N optimizer steps (and always at the end).
    keep: how many recent checkpoints to keep.
    resume: ``auto`` continues from the folder's latest checkpoint when there is one; ``never``
      refuses a folder that already holds checkpoints (pick another ``name`` or delete it).
    """

    dir: Location | None = None
    every_steps: int = Field(100, ge=1)
    keep: int = Field(2, ge=1)
    resume: Literal["auto", "never"] = "auto"


class SamplesSection(ConfigModel):
    """Sample grids logged to MLflow: a fixed prompt set from the snapshot's val split.

    per_group: prompts per (language, short/long) group; long = more LLM tokens than one CLIP window.
    every_steps: also log a grid every N steps (0 = only at the end).
    steps / guidance_scale / seed: DPM-Solver++ sampling of the grid.
    """

    per_group: int = Field(1, ge=0)
    every_steps: int = Field(0, ge=0)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    seed: int = 0


# pydantic's metaclass is an ABCMeta, whose ``register`` it sees on the class; instances read the field.
warnings.filterwarnings("ignore", message='Field name "register" in "RegistrySection" shadows', category=UserWarning)


class RegistrySection(ConfigModel):
    """Export + MLflow registry.

    export_dir: pipeline folder or ``s3://`` prefix to write; ``null`` = ``<storage.root>/exports/<name>``,
      else ``$OMNIDIFF_HOME/exports/<name>``. On object storage the folder is uploaded with a manifest
      written last; loaders (``omnidiff.tracking.resolve_model``) download it by its manifest digest.
    register: register the export as a version of ``model_name`` and point ``alias`` at it.
    model_name: the registered model; null: the run's own data's, ``omnidiff-<snapshot name>``
      (train/registry.py ``model_name_for``; the demo's snapshot ``tiny`` gives ``omnidiff-tiny``).
    stage_alias: also point ``stage<N>`` at it (what the next stage's ``init_from`` can name).
    copy_llm: copy the LLM's files into the export's ``text_encoder/`` (a folder that stands alone);
      off, the export names the LLM by id and weights digest, found under ``$OMNIDIFF_MODELS/llm/``
      or ``$OMNIDIFF_LLM_PATH`` wherever it is loaded.
    """

    export_dir: Location | None = None
    register: bool = True
    model_name: NonBlank | None = None
    alias: NonBlank = "candidate"
    stage_alias: bool = True
    copy_llm: bool = False


UNET_PARTS = ("none", "all", "attention", "cross_attention")


class TrainConfig(ConfigModel):
    """One training stage (PAPER.md "The three stages"; DESIGN.md "train").

    stage: 1 alignment (adapter only, loss against cached CLIP states; options in ``align``),
      2 end to end (noise prediction on cached pixels; options in ``diffusion``), 3 high-aesthetic
      fine-tune (stage 2's loss on the subset with ``data.aesthetic_min``).
    name: run name: the checkpoint folder, MLflow run name and export folder name.
    base_model: the existing text-to-image model's pipeline folder (conditioning ``clip``), or a
      registry reference ``name@alias`` / ``name/version``. Its UNet is the stage-2 starting point and
      its text encoder named the stage-1 targets.
    init_from: the parent stage's export (folder or registry reference): stage 2 takes its adapter,
      stage 3 its adapter and UNet. ``null`` starts the adapter fresh (stage 1). ``auto``: the previous
      stage of this run's own model, ``<model>@stage<N-1>`` with ``<model>`` as ``registry.model_name``
      resolves (the run's snapshot's unless named); fresh for stage 1.
    align: stage 1's options (AlignSection); diffusion: stages 2-3's (DiffusionSection).
    micro_batch_size: examples per rank per forward; global_batch_size: examples per optimizer step
      (= micro x gradient accumulation x workers).
    max_steps: optimizer steps.
    ema_decay: keep an EMA of the trained weights, exported instead of the raw ones (0 = off).
    log_every: steps between loss lines / MLflow metric points.
    seed: model init, data order, noise and dropout; a run is a function of (config, seed).
    track: log the run to MLflow (``MLFLOW_TRACKING_URI``, else a local store under home).
    storage: default root and S3 endpoint / credentials (``StorageSection``); the ranks get the driver's
      resolved settings in their (pickled) job.
    """

    kind: ClassVar[str] = "train"

    stage: Literal[1, 2, 3] = 1
    name: str = Field("stage1", pattern=r"^[^/.][^/]*$")  # a plain folder name (no '/', not hidden)
    base_model: NonBlank
    init_from: str | None = None
    llm: LLMSection = Field(default_factory=LLMSection)
    data: DataSection = Field(default_factory=DataSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    align: AlignSection | None = None
    diffusion: DiffusionSection | None = None
    optim: OptimSection = Field(default_factory=OptimSection)
    micro_batch_size: int = Field(32, ge=1)
    global_batch_size: int = 32
    max_steps: int = Field(100, ge=1)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    dist: DistSection = Field(default_factory=DistSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    track: bool = True
    storage: StorageSection = Field(default_factory=StorageSection)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.stage == 1:
            require(self.align is not None, "align", self.align,
                    "stage 1 needs its align section (align: {} for the defaults)")
            require(self.diffusion is None, "diffusion", self.diffusion,
                    "stage 1 trains the adapter alone against CLIP states: stage 2-3 options do not apply")
            need = 77 * self.align.clip_windows
            require(self.adapter.num_queries >= need, "adapter.num_queries", self.adapter.num_queries,
                    f"stage 1 answers each CLIP token with its own query: needs >= 77 x align.clip_windows = {need}")
        else:
            require(self.diffusion is not None, "diffusion", self.diffusion,
                    f"stage {self.stage} needs its diffusion section (diffusion: {{}} for the defaults)")
            require(self.align is None, "align", self.align, "stage 1's options do not apply to stages 2-3")
            require(self.init_from is not None, "init_from", self.init_from,
                    f"stage {self.stage} starts from the previous stage's export (folder or name@alias)")
        require(self.stage != 3 or self.data.aesthetic_min is not None, "data.aesthetic_min",
                self.data.aesthetic_min, "stage 3 trains on the high-aesthetic subset: set a threshold")
        per_step = self.micro_batch_size * self.dist.num_workers
        require(self.global_batch_size % per_step == 0, "global_batch_size", self.global_batch_size,
                f"must be a multiple of micro_batch_size x dist.num_workers = {per_step}")
        require(self.ema_decay == 0 or self.dist.zero_stage < 3, "ema_decay", self.ema_decay,
                "EMA needs whole parameters on every rank: use dist.zero_stage <= 2")
        require(self.track or not self.registry.register, "registry.register", self.registry.register,
                "registering needs an MLflow run: set track true, or registry.register false")
        require(self.optim.warmup_steps <= self.max_steps, "optim.warmup_steps", self.optim.warmup_steps,
                f"longer than the run (max_steps={self.max_steps})")
        return self

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.dist.num_workers)

    @property
    def family(self) -> str:
        """The loss family: ``align`` (stage 1) or ``diffusion`` (stages 2-3)."""
        return "align" if self.stage == 1 else "diffusion"
