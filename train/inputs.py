"""What a training stage reads, resolved and checked before any worker starts.

``resolve_inputs(cfg) -> StageInputs``:

1. resolves the base model, the parent stage's export (``init_from``) and the pair snapshot;
2. opens the caches named by the configured encoders' fingerprints (``omnidiff.contracts.encoders``,
   the rules the embed stage names them by; no weights loaded) and refuses with a clear error when
   the cache for this encoder is missing or a cache differs from it; checks every example's key is
   cached; builds the example tables (train and val);
3. picks the sample prompt set (every language, short and long) and takes its LLM states from the
   cache, encoding only what is missing once here, outside the training step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from omnidiff.contracts.encoders import (
    CacheSpec,
    base_clip_spec,
    is_published_base,
    llm_folder,
    llm_spec,
    pixels_spec,
    vae_scale_factor,
)
from omnidiff.contracts.keys import EMPTY_PROMPT, text_key
from train.config import TrainConfig
from train.data import (
    CacheMismatchError,
    align_examples,
    diffusion_examples,
    open_checked_cache,
    require_keys,
    sample_prompt_table,
)
from train.registry import INIT_FROM_AUTO, parent_ref


class TrainingError(RuntimeError):
    """A training run could not start or its workers failed; the message says why."""


@dataclass
class StageInputs:
    """Everything resolved before the workers start."""

    base_model: Path
    init_from: Path | None
    snapshot: Any
    llm_path: Path
    llm_encoder_inputs: dict
    llm_dim: int
    out_dim: int  # the adapter's token width: the UNet's cross-attention width
    pooled_dim: int  # the adapter's pooled width: SDXL's text_embeds width, else out_dim
    stores: dict[str, Any]
    examples: pd.DataFrame
    val_examples: pd.DataFrame | None = None
    prompts: list[dict] = field(default_factory=list)
    empty_states: np.ndarray | None = None
    scheduler_config: dict = field(default_factory=dict)
    parent_lineage: dict = field(default_factory=dict)
    llm_stats: tuple[np.ndarray, np.ndarray] | None = None
    init_ref: str | None = None  # what init_from named, ``auto`` resolved (train.registry.parent_ref)


# ----------------------------------------------------------------------------------- inputs


def resolve_model_ref(ref: str, what: str, storage=None) -> Path:
    """A pipeline folder from a folder path, a registry reference (omnidiff.tracking.resolve_model), or a
    base config YAML (``kind: base``), meaning the base model ``omnidiff base pretrain`` made from it."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from omnidiff.base.config import BaseConfig
        from omnidiff.base.pretrain import base_dir, is_complete
        from omnidiff.config import load_config

        folder = base_dir(load_config(BaseConfig, path))
        if not is_complete(folder):
            raise TrainingError(f"{what}={ref!r}: its base model is not trained yet ({folder}); "
                                f"run 'omnidiff base pretrain --config {ref}' first")
        return folder
    from omnidiff.contracts.storage import is_remote
    from omnidiff.tracking import is_model_ref

    if is_model_ref(ref) or is_remote(ref):  # a registry version, or an export published to object storage
        from omnidiff.tracking import TrackingError, resolve_model

        try:
            return Path(resolve_model(ref, storage))
        except TrackingError as exc:
            raise TrainingError(f"{what}={ref!r}: {exc}") from None
    raise TrainingError(f"{what}={ref!r}: no such folder, and not a registry reference like "
                        "'omnidiff-tiny@candidate' or 'omnidiff-tiny/3'")


def open_snapshot(ref: str, root=None, storage=None):
    """The snapshot ``ref`` names: a folder, an ``s3://`` snapshot URL, or a name (its ``LATEST`` under ``root``)."""
    from omnidiff.contracts.snapshot import Snapshot, latest_snapshot
    from omnidiff.contracts.storage import is_remote

    if is_remote(ref):
        return Snapshot.open(ref, storage=storage)
    path = Path(ref).expanduser()
    return Snapshot.open(path if path.is_dir() else latest_snapshot(ref, root, storage), storage=storage)


def cache_specs(cfg: TrainConfig, base: Path, llm_path: Path, unet_config: dict) -> dict[str, CacheSpec]:
    """The caches this stage reads, named from its encoders' settings as the embed stage names them."""
    kinds = ("llm", "clip") if cfg.family == "align" else ("llm", "pixels")
    specs = {"llm": llm_spec(llm_path, cfg.llm.layer, cfg.llm.max_length, cfg.llm.dtype)}
    if "clip" in kinds:
        specs["clip"] = base_clip_spec(base, cfg.align.clip_windows)
    if "pixels" in kinds:
        vae = base / "vae" if (base / "vae").is_dir() else None
        resolution = int(unet_config["sample_size"])
        if vae is not None:
            resolution *= vae_scale_factor(json.loads((vae / "config.json").read_text()))
        specs["pixels"] = pixels_spec(resolution, vae)
    return specs


def resolve_inputs(cfg: TrainConfig, storage=None) -> StageInputs:
    """Steps 1-3 of the module docstring. ``storage``: resolved S3 settings (default: ``cfg.storage.s3``)."""
    storage = storage or cfg.storage.s3
    base = resolve_model_ref(cfg.base_model, "base_model", storage)
    for sub in ("unet", "scheduler"):
        if not (base / sub).is_dir():
            raise TrainingError(f"base_model={cfg.base_model!r}: {base / sub} is missing (not a pipeline folder)")
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    out_dim, pooled_dim = adapter_widths(base, unet_config)
    snapshot = open_snapshot(cfg.data.snapshot, cfg.storage.under(cfg.data.snapshot_root, "data", "snapshots"),
                             storage)
    init_ref = parent_ref(cfg, snapshot.name)
    try:
        init_from = resolve_model_ref(init_ref, "init_from", storage) if init_ref else None
    except TrainingError as exc:
        if cfg.init_from != INIT_FROM_AUTO:
            raise
        raise TrainingError(f"init_from=auto: the stage-{cfg.stage - 1} model of this run's data is {init_ref} "
                            f"(snapshot {snapshot.name!r}), and it cannot be loaded ({exc}). Train stage "
                            f"{cfg.stage - 1} on this snapshot first (it registers @stage{cfg.stage - 1}), or set "
                            "init_from to an export folder or registry reference") from None
    parent_lineage = {}
    if init_from is not None:
        if not (init_from / "adapter").is_dir():
            raise TrainingError(f"init_from={init_ref!r}: {init_from} has no adapter/ (not an llm_adapter export)")
        if (init_from / "lineage.json").is_file():
            parent_lineage = json.loads((init_from / "lineage.json").read_text())

    llm_path = llm_folder(cfg.llm.path)
    stores: dict[str, Any] = {}
    for kind, spec in cache_specs(cfg, base, llm_path, unet_config).items():
        if kind == "llm":
            what = "the configured LLM (llm.*)"
        elif kind == "clip":
            what = f"the base model's text encoder ({base.name}, {cfg.align.clip_windows} windows)"
        else:
            what = f"the base model's image space ({spec.value_shape})"
        stores[kind] = open_checked_cache(kind, spec.inputs, cfg.storage.under(cfg.data.cache_root, "cache"), what,
                                          storage)
        if kind == "llm":
            llm_encoder_inputs = spec.inputs["encoder"]
    llm_dim = int(stores["llm"].hidden_size)
    if cfg.family == "align" and stores["clip"].hidden_size != out_dim:
        raise CacheMismatchError(f"CLIP cache hidden size {stores['clip'].hidden_size} != the base UNet's "
                                 f"cross_attention_dim {out_dim}")
    if cfg.family == "align" and stores["clip"].pooled_dim != pooled_dim:
        raise CacheMismatchError(f"CLIP cache pooled width {stores['clip'].pooled_dim} != the base's pooled "
                                 f"embedding width {pooled_dim}")
    if init_from is not None:
        _check_parent(init_from, llm_encoder_inputs, llm_dim, out_dim, pooled_dim)

    # -- examples
    use_parallel = cfg.family == "align" and cfg.align.use_parallel and bool(snapshot.shard_paths("parallel"))
    examples, pairs, parallel = gather_examples(cfg, snapshot, use_parallel)
    if cfg.family == "align":
        if cfg.align.langs:  # e.g. [en]: stage 1 on English alone (MuLan), the other languages zero-shot
            examples = examples[examples["lang"].isin(cfg.align.langs)].reset_index(drop=True)
            if len(examples) == 0:
                raise TrainingError(f"align.langs={list(cfg.align.langs)}: no stage-1 examples in these languages "
                                    f"in snapshot {snapshot.path} split {cfg.data.split!r}")
        require_keys(stores["clip"], examples["target_key"].tolist(), "English-side texts")
        check_targets(stores["clip"], examples["target_key"].tolist(), cfg.align.min_distinct_targets,
                      cfg.align.allow_collapsed_targets)
    else:
        require_keys(stores["pixels"], examples["pixel_key"].tolist(), "images")
    if len(examples) == 0:
        raise TrainingError(
            f"no training examples in snapshot {snapshot.path} split {cfg.data.split!r}"
            + (f" with aesthetic >= {cfg.data.aesthetic_min}" if cfg.data.aesthetic_min is not None else "")
        )
    require_keys(stores["llm"], examples["llm_key"].tolist(), "captions")
    if cfg.family == "align":
        examples = with_empty_prompt(examples, stores, cfg.align.empty_share)
    val_examples = _val_examples(cfg, pairs, parallel if cfg.family == "align" else None, stores)
    llm_stats = None
    if init_from is None and cfg.adapter.input_norm:
        llm_stats = llm_state_stats(stores["llm"], examples["llm_key"].tolist())

    scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    inputs = StageInputs(base, init_from, snapshot, llm_path, llm_encoder_inputs, llm_dim, out_dim, pooled_dim,
                         stores, examples, val_examples, scheduler_config=scheduler_config,
                         parent_lineage=parent_lineage, llm_stats=llm_stats, init_ref=init_ref)
    _prompt_states(cfg, inputs, pairs)
    return inputs


def iter_states(store, keys: list[str], read_log: list | None = None):
    """``(key, float16 (L, D))`` for every one of ``keys`` (distinct), shard by shard: only the Parquet row groups
    of one shard that hold wanted rows are decoded at a time, and shard files are read, not memory-mapped
    (:class:`train.data.ResidentShards`). ``CacheStore.read`` of thousands of keys instead held all their states at
    once, whole shards, and the mapped pages of every shard it touched (issue 17: the driver's peak grew with the
    cache). ``read_log`` (tests) receives each read's ``(shard ids, rows)``."""
    from train.data import ResidentShards, _states_of, fixed_width_keys

    if not keys:
        return
    shards = ResidentShards(store, max_resident=1, read_log=read_log)
    try:
        shard, row = shards.locate(fixed_width_keys(pa.array(keys, pa.string())), f"texts of the {store.kind} cache")
        for s in np.unique(shard).tolist():
            mine = np.flatnonzero(shard == s)
            flat, lengths = _states_of(shards.take(shard[mine], row[mine], ["states"]), store.hidden_size)
            ends = np.cumsum(lengths)  # (n,): flat holds the n texts' (L, D) states back to back
            for i, end, length in zip(mine.tolist(), ends.tolist(), lengths.tolist(), strict=True):
                yield keys[i], flat[end - length : end]
            shards.release()  # one shard's decoded groups and file at a time
            pa.default_memory_pool().release_unused()
    finally:
        shards.close()


PAIR_COLUMNS = ["caption", "lang", "caption_en", "split", "image_digest", "aesthetic"]
PARALLEL_COLUMNS = ["text", "lang", "text_en", "split"]


def snapshot_frames(snapshot, table: str, columns: list[str]):
    """One DataFrame per listed shard of ``table`` (``columns`` only), in shard order."""
    for shard in snapshot.iter_shards(table, columns):
        yield shard.to_pandas()


def gather_examples(cfg: TrainConfig, snapshot, use_parallel: bool):
    """``(examples, val pairs, val parallel texts or None)``, reading the snapshot shard by shard: the driver
    holds one shard's captions at a time and keeps only the val split's rows (for validation examples and the
    sample prompts; every pair when no row is in val), not the whole pairs table (issue 17). The examples are those
    :func:`train.data.align_examples` / :func:`train.data.diffusion_examples` make of the whole table: per shard,
    then the first of each (LLM text, target) in input order, sorted by key."""
    split = cfg.data.split
    parts, val_pairs, val_parallel = [], [], []
    for frame in snapshot_frames(snapshot, "pairs", PAIR_COLUMNS):
        if cfg.family == "align":
            parts.append(align_examples(frame, None, split))
        else:
            parts.append(diffusion_examples(frame, split, cfg.data.aesthetic_min))
        val_pairs.append(frame[frame["split"] == "val"])
    if use_parallel:
        no_pairs = pd.DataFrame(columns=["caption", "lang", "caption_en", "split"])
        for frame in snapshot_frames(snapshot, "parallel", PARALLEL_COLUMNS):
            parts.append(align_examples(no_pairs, frame, split))
            val_parallel.append(frame[frame["split"] == "val"])
    examples = pd.concat(parts, ignore_index=True)
    if cfg.family == "align":  # align_examples' own rule, across shards: the first (text, target) kept
        examples = examples.drop_duplicates(["llm_key", "target_key"]).sort_values(["llm_key", "target_key"])
    else:
        examples = examples.sort_values(["pixel_key", "llm_key"])
    pairs = pd.concat(val_pairs, ignore_index=True)
    if len(pairs) == 0:  # no val split: the sample prompts come from every pair (sample_prompt_table)
        pairs = snapshot.pairs(PAIR_COLUMNS).to_pandas()
    parallel = pd.concat(val_parallel, ignore_index=True) if use_parallel else None
    return examples.reset_index(drop=True), pairs, parallel


def distinct_target_share(store, keys: list[str], max_texts: int = 4096) -> tuple[float, int]:
    """``(share, n)``: of ``n`` distinct target keys (an even sample of at most ``max_texts``), the share
    whose cached CLIP states are distinct. States are compared rounded to 2 decimals, so one token-id
    sequence computed in two batches (float noise) counts once."""
    distinct_keys = sorted(set(keys))
    if len(distinct_keys) > max_texts:
        distinct_keys = [distinct_keys[i] for i in np.linspace(0, len(distinct_keys) - 1, max_texts).astype(int)]
    if not distinct_keys:
        return 1.0, 0
    seen = set()
    for _, states in iter_states(store, distinct_keys):
        rounded = np.round(np.asarray(states, dtype=np.float32), 2) + 0.0  # + 0.0: -0.0 and 0.0 alike
        seen.add((rounded.shape, rounded.tobytes()))
    return len(seen) / len(distinct_keys), len(distinct_keys)


def check_targets(store, keys: list[str], min_share: float, allow: bool) -> float:
    """Refuse stage 1 when its CLIP targets collapse (``align.min_distinct_targets``); returns the share.

    With ``allow`` (``align.allow_collapsed_targets``) it only warns."""
    if min_share <= 0:
        return 1.0
    share, n = distinct_target_share(store, keys)
    if share >= min_share:
        return share
    message = (
        f"stage 1's CLIP targets collapse: only {share:.0%} of {n} distinct English texts have a distinct target "
        f"(align.min_distinct_targets={min_share}); the base's tokenizer likely maps their words to <unk> "
        "(see the embed run's clip.unknown_fraction), so the adapter cannot learn to tell them apart. Use a base "
        "whose tokenizer knows these words, or set align.allow_collapsed_targets=true to train anyway"
    )
    if not allow:
        raise TrainingError(message)
    import logging

    logging.getLogger("omnidiff.train").warning("%s (allowed by align.allow_collapsed_targets)", message)
    return share


def with_empty_prompt(examples: pd.DataFrame, stores: dict, share: float) -> pd.DataFrame:
    """Stage-1 examples plus copies of ("" -> CLIP's ""), ``share`` of the result, when both caches hold "".

    Classifier-free guidance contrasts every prompt with the adapter's output for "", so that output
    must land where the base UNet's unconditional input (CLIP of "") is. A base whose pipeline zeros
    the unconditional embedding (SDXL's ``force_zeros_for_empty_prompt``: its "" target is all zeros)
    gets none: there is no direction to learn, and the pipeline feeds zeros, not the adapter's output.
    """

    key = text_key(EMPTY_PROMPT)
    if share <= 0 or key not in stores["llm"] or key not in stores["clip"]:
        return examples
    if not np.any(stores["clip"].read([key])[key]):
        print("[train] the base zeros its unconditional embedding (force_zeros_for_empty_prompt): "
              "no '' examples in stage 1", flush=True)
        return examples
    copies = max(1, round(share * len(examples) / (1 - share)))
    empty = pd.DataFrame({"llm_key": [key] * copies, "target_key": [key] * copies, "lang": [""] * copies,
                          "source": ["empty"] * copies})
    return pd.concat([examples, empty], ignore_index=True)


def llm_state_stats(store, keys: list[str], max_texts: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the LLM states over the real tokens of (up to ``max_texts``) cached texts.

    The texts are the first ``max_texts`` distinct keys in sorted order, so every run over the same
    examples gets the same statistics (and so the same adapter).
    """
    chosen = sorted(set(keys))[:max_texts]
    total = np.zeros(store.hidden_size, dtype=np.float64)
    total_sq = np.zeros(store.hidden_size, dtype=np.float64)
    count = 0
    sums: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # per text; added up below in ``chosen`` order
    for key, states in iter_states(store, chosen):
        x = np.asarray(states, dtype=np.float64)  # (L, D)
        sums[key] = (x.sum(0), np.square(x).sum(0), x.shape[0])
    for key in chosen:
        x_sum, x_sq, n = sums[key]
        total += x_sum
        total_sq += x_sq
        count += n
    if count == 0:
        raise TrainingError("adapter.input_norm: the LLM cache holds no token states for the training texts")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def _val_examples(cfg: TrainConfig, pairs: pd.DataFrame, parallel, stores: dict) -> pd.DataFrame | None:
    """Up to ``data.val_examples`` examples of the val split (same filters) whose keys are all cached."""
    if cfg.data.val_examples == 0 or cfg.data.split == "val":
        return None
    if cfg.family == "align":
        table = align_examples(pairs, parallel, "val")
        cached = table["target_key"].isin(set(stores["clip"].keys()))
    else:
        table = diffusion_examples(pairs, "val", cfg.data.aesthetic_min)
        cached = table["pixel_key"].isin(set(stores["pixels"].keys()))
    table = table[cached & table["llm_key"].isin(set(stores["llm"].keys()))]
    if len(table) == 0:
        print("[train] no cached val examples: validation loss is off", flush=True)
        return None
    return table.head(cfg.data.val_examples).reset_index(drop=True)


def adapter_widths(base: Path, unet_config: dict) -> tuple[int, int]:
    """``(token width, pooled width)`` the adapter must output for ``base``: the UNet's cross-attention
    width (SDXL: 2048 = 768 + 1280, both towers' features), and SDXL's ``text_embeds`` width (1280) or,
    where the base has no pooled input of its own width, the token width."""
    out_dim = int(unet_config["cross_attention_dim"])
    if not is_published_base(base):
        return out_dim, out_dim
    from omnidiff.contracts.base_folder import BaseFolderError, open_base_folder

    try:
        folder = open_base_folder(base)
    except BaseFolderError as exc:
        raise TrainingError(f"base_model: {exc}") from None
    return folder.cross_attention_dim, folder.pooled_dim or folder.cross_attention_dim


def _check_parent(init_from: Path, llm_inputs: dict, llm_dim: int, out_dim: int, pooled_dim: int) -> None:
    """The parent export must have been trained on the same LLM and for the same UNet widths."""
    adapter_cfg = json.loads((init_from / "adapter" / "config.json").read_text())
    theirs = (adapter_cfg["llm_dim"], adapter_cfg["out_dim"], adapter_cfg.get("pooled_dim", adapter_cfg["out_dim"]))
    if theirs != (llm_dim, out_dim, pooled_dim):
        raise TrainingError(f"init_from {init_from}: adapter maps {theirs[0]} -> {theirs[1]} tokens + {theirs[2]} pooled, "
                            f"but this stage needs {llm_dim} (LLM cache) -> {out_dim} (UNet) + {pooled_dim} pooled")
    ref_path = init_from / "text_encoder" / "encoder.json"
    if ref_path.is_file():
        ref = json.loads(ref_path.read_text())
        theirs = (ref.get("weights_digest"), ref.get("layer"), ref.get("max_length"))
        ours = (llm_inputs["weights_digest"], llm_inputs["layer"], llm_inputs["max_length"])
        if theirs != ours:
            raise CacheMismatchError(
                f"init_from {init_from} was trained on LLM {ref.get('model_id')} (weights {str(theirs[0])[:12]}..., "
                f"layer {theirs[1]}, max_length {theirs[2]}); configured: weights {ours[0][:12]}..., layer {ours[1]}, "
                f"max_length {ours[2]}"
            )


def _prompt_states(cfg: TrainConfig, inputs: StageInputs, pairs: pd.DataFrame) -> None:
    """The sample prompt set with LLM states (cache first; the LLM encodes only what is missing) and ""'s states."""

    store = inputs.stores["llm"]
    empty_key = text_key(EMPTY_PROMPT)
    table = pd.DataFrame()
    if cfg.samples.per_group > 0:
        lengths = store.lengths()
        table = sample_prompt_table(pairs, lengths, cfg.samples.per_group)
    wanted = [empty_key, *table.get("llm_key", pd.Series(dtype=str)).tolist()]
    cached = store.read([k for k in wanted if k in store])
    missing = [k for k in wanted if k not in cached]
    if missing:
        from omnidiff.models.llm import LLMTextEncoder

        texts = {empty_key: EMPTY_PROMPT, **dict(zip(table.get("llm_key", []), table.get("prompt", []), strict=True))}
        encoder = LLMTextEncoder(inputs.llm_path, layer=cfg.llm.layer, max_length=cfg.llm.max_length, dtype=cfg.llm.dtype)
        states, mask = encoder.encode([texts[k] for k in missing])  # (n, T, D), (n, T)
        for i, key in enumerate(missing):
            cached[key] = states[i, mask[i]].numpy().astype(np.float16)
        del encoder
    inputs.empty_states = cached[empty_key]
    inputs.prompts = [
        {"prompt": row.prompt, "lang": row.lang, "group": row.group, "states": cached[row.llm_key]}
        for row in table.itertuples(index=False)
    ]
