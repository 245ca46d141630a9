"""``EmbedConfig``: what the embed stage reads, which caches it fills, and how it spreads the work.

    omnidiff embed --config configs/embed.yaml llm.max_length=256 num_actors=2

Loaded from YAML (``kind: embed``) with dotted overrides (omnidiff.config); the same object is the
Prefect flow's parameter and what MLflow logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from omnidiff.config import ConfigModel, NonBlank, require
from omnidiff.contracts.cache import SHARD_ROW_GROUP_ROWS
from omnidiff.contracts.encoders import LLMSection  # one definition: the train stage reads what embed wrote
from omnidiff.contracts.storage import Location, StorageSection

CacheKind = Literal["llm", "clip", "pixels"]


class ClipSection(ConfigModel):
    """The base model's CLIP-style text encoder: the stage-1 target on the English side.

    base_model: the base model's pipeline folder: the tiny base (``text_encoder/`` + ``tokenizer/``) or a
      published Stable Diffusion 1.x / SDXL diffusers folder (``model_index.json``, tokenizers as
      ``vocab.json`` + ``merges.txt``, ``fp16`` variant accepted), whose targets are what its own
      pipeline feeds its UNet (all 77 positions of each window; SDXL: both towers + ``text_embeds``);
      a registry reference (``name@alias``) works too; ``null`` = the newest base model that
      ``omnidiff base pretrain`` wrote under ``models_dir()/base``.
    max_windows: long captions are encoded in up to this many stitched 77-token windows (PAPER.md).
    """

    base_model: Path | None = None
    max_windows: int = Field(3, ge=1, le=16)


class PixelsSection(ConfigModel):
    """What stages 2-3 train on, keyed by image digest.

    resolution: images are resized (shorter side, bicubic) and centre-cropped to this square size
      when they differ; stored as float16 (C, H, W) in [-1, 1].
    vae: a diffusers ``AutoencoderKL`` folder (SD-class models, e.g. ``<base>/vae``): store its latents
      (posterior mean x scaling factor; fp32 where its config says ``force_upcast``) and each image's
      original size and crop (SDXL's time ids) instead of pixels. ``null`` for the tiny world, whose
      UNet works on pixels. ``resolution`` is then the base's native size (SD 1.5: 512, SDXL: 1024).
    batch_size: images per decode / VAE forward (a 1024 px VAE batch of 8 already needs GBs).
    """

    resolution: int = Field(16, ge=4)
    vae: Path | None = None
    batch_size: int = Field(64, ge=1)


class EmbedConfig(ConfigModel):
    """The embed stage (DESIGN.md stage 2; docs/architecture.md "Embedding cache").

    snapshots: pair snapshots to embed; a name means the newest snapshot of that name
      (``<snapshot_root>/<name>/LATEST``), a path or ``s3://`` URL means that snapshot directory.
    snapshot_root: where named snapshots are looked up; ``null`` = ``<storage.root>/data/snapshots``, else
      ``$OMNIDIFF_HOME/data/snapshots``.
    kinds: which caches to fill: ``llm`` (every distinct caption + parallel text + ""), ``clip``
      (English side, stage-1 target), ``pixels`` (decoded images or VAE latents, stages 2-3).
    cache_root: where ``<kind>/<fingerprint>/`` live (a folder or ``s3://bucket/prefix``); ``null`` =
      ``<storage.root>/cache``, else ``$OMNIDIFF_HOME/cache``.
    storage: default root and S3 endpoint / credentials (``StorageSection``); the actors get the
      driver's resolved settings inside their (pickled) arguments.
    include_parallel: also embed the snapshot's parallel texts (stage-1 translation pairs).
    splits: which snapshot splits to embed.
    executor: ``ray`` (Ray Data over an actor pool), ``local`` (the same actor class called in this
      process, no Ray: debugging and tiny updates) or ``auto`` (the default: ``local`` when a CPU run's
      missing work is at most ``auto_local_max_units`` tokens (+ images), ``ray`` otherwise; a small
      nightly delta then skips the actor start-up and model loads that would cost more than it).
    auto_local_max_units: ``auto``'s threshold, in the kinds' units (tokens for text, 1 per image).
    num_actors: Ray actors (each loads each model once); threads_per_actor: torch threads (= CPUs
      reserved) per actor; num_gpus_per_actor > 0 schedules each actor on a GPU.
    device: torch device of the actors (``cpu``, ``cuda``).
    max_tokens: padded token-slots per compute batch (batch size x longest length in it). On CPU
      about 1024 is fastest: larger batches' activations spill the caches (1024 slots run 25% faster
      than 4096 with Gemma 3 270M on 2 cores); GPUs want tens of thousands (configs/gpu/).
    max_batch_size: captions per compute batch at most.
    batch_overhead_slots: the fixed cost of one forward pass in token slots: a shard's rows are cut
      into batches minimising padded slots + this per batch (``batching.pack_batches``). Measured
      for Gemma 3 270M on 2 cores: a forward costs ~33 ms + ~1.07 ms per slot, so ~32. 0 = greedy
      (every batch as full as ``max_tokens`` allows).
    share_prefixes: captions of a shard that start with the same ``share_prefixes`` or more LLM
      tokens compute that prefix once (a causal LM's states of a prefix do not depend on what
      follows; its cached keys and values seed the rest). 0 = off. Not a fingerprint input: the
      states agree with an unshared run to fp32 rounding (tests/test_embed_job.py checks). Only for
      causal LMs (ignored, with a warning, for a bidirectional encoder).
    share_cache_mb: memory for the prefixes' keys and values held for later captions, per actor
      (Gemma 3 270M in fp32: 36 KiB per token, so 2048 MB holds ~57k tokens, more than a shard).
    shard_tokens, shard_rows: the unit of work one actor call computes and writes as one shard.
    row_group_rows: rows per Parquet row group of a written shard. A training rank decodes whole groups, only the
      ones holding its batch's rows, so the rows it decodes per sample grow with this (issue 17: at 32 a
      cold 10N run decoded ~4x the rows per sample of an N run, at 8 ~1.5x, yet trained no faster in
      benchmarks/scale.py); smaller groups cost ~0.3 KB of footer each and a few % of file size. A storage
      layout, not a fingerprint input: readers take any.
    dedup_partition_rows: snapshot rows per partition of the driver's dedup pass (embed_cache/inputs.py
      ``KeyPartitions``): the driver holds one partition's distinct keys and texts at a time, so at most about
      this many, whatever the corpus size (issue 17).
    progress_every_s: seconds between progress lines.
    track: log the run to MLflow (experiment ``omnidiff``).
    """

    kind: ClassVar[str] = "embed"

    snapshots: tuple[NonBlank, ...] = Field(("tiny",), min_length=1)
    kinds: tuple[CacheKind, ...] = Field(("llm", "clip", "pixels"), min_length=1)
    cache_root: Location | None = None
    snapshot_root: Location | None = None
    storage: StorageSection = Field(default_factory=StorageSection)
    include_parallel: bool = True
    splits: tuple[str, ...] = Field(("train", "val"), min_length=1)
    llm: LLMSection = Field(default_factory=LLMSection)
    clip: ClipSection = Field(default_factory=ClipSection)
    pixels: PixelsSection = Field(default_factory=PixelsSection)
    executor: Literal["ray", "local", "auto"] = "auto"
    auto_local_max_units: int = Field(8192, ge=0)
    num_actors: int = Field(1, ge=1)
    threads_per_actor: int = Field(2, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    max_tokens: int = Field(1024, ge=1)
    max_batch_size: int = Field(128, ge=1)
    batch_overhead_slots: int = Field(32, ge=0)
    share_prefixes: int = Field(4, ge=0)
    share_cache_mb: float = Field(2048, gt=0)
    shard_tokens: int = 32768
    shard_rows: int = Field(2048, ge=1)
    row_group_rows: int = Field(SHARD_ROW_GROUP_ROWS, ge=1)
    dedup_partition_rows: int = Field(1 << 18, ge=1)
    progress_every_s: float = Field(5.0, gt=0)
    track: bool = True

    @model_validator(mode="after")
    def _check(self) -> EmbedConfig:
        require(len(set(self.kinds)) == len(self.kinds), "kinds", self.kinds, "a kind is listed twice")
        require(not self.device.startswith("cuda") or self.num_gpus_per_actor > 0, "num_gpus_per_actor",
                self.num_gpus_per_actor, "device is cuda: give each actor a GPU (e.g. 1)")
        require(self.shard_tokens >= self.max_tokens, "shard_tokens", self.shard_tokens,
                f"must be >= max_tokens ({self.max_tokens}) so a shard holds at least one full batch")
        return self
