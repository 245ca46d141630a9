"""The driver of a training stage: resolve and check inputs, run the workers, export, register.

    omnidiff train --config configs/train_stage1.yaml dist.num_workers=2

``run(cfg)``:

1. resolves the base model, the parent stage's export (``init_from``) and the pair snapshot;
2. opens the caches named by the configured encoders' fingerprints (``omnidiff.contracts.encoders``,
   the rules the embed stage names them by; no weights loaded) and refuses with a clear error when
   the cache for this encoder is missing or a cache differs from it; checks every example's key is
   cached; writes the example table;
3. picks the sample prompt set (every language, short and long) and takes its LLM states from the
   cache, encoding only what is missing once here, outside the training step;
4. checks that an existing checkpoint folder belongs to the same training (config and inputs), so
   a resume can never continue someone else's run;
5. opens an MLflow run (resolved config, inputs, lineage) and launches ``train.loop.train_worker``
   as a Ray Train ``TorchTrainer`` job of N workers (or in-process for ``dist.launcher: local``);
6. exports the pipeline folder and registers it under the alias ``candidate`` with lineage tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from omnidiff.config import to_dict
from omnidiff.contracts.encoders import CacheSpec, clip_spec, llm_folder, llm_spec, pixels_spec, vae_scale_factor
from omnidiff.env import subdir
from train.config import TrainConfig
from train.data import (
    EMPTY_PROMPT,
    CacheMismatchError,
    align_examples,
    diffusion_examples,
    open_checked_cache,
    require_keys,
    sample_prompt_table,
)
from train.loop import latest_tag

# Settings that may change between a run and its resume (how it runs, not what it trains).
RESUMABLE_CHANGES = ("name", "max_steps", "dist", "checkpoint", "samples", "registry", "log_every", "track",
                     "micro_batch_size")
IDENTITY_NAME = "run_identity.json"
# Environment a Ray worker needs to see the same home, caches and tracking server as the driver.
WORKER_ENV = ("OMNIDIFF_HOME", "OMNIDIFF_MODELS", "MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR", "HF_HOME",
              "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "PYTHONWARNINGS")


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
    out_dim: int
    stores: dict[str, Any]
    examples: pd.DataFrame
    val_examples: pd.DataFrame | None = None
    prompts: list[dict] = field(default_factory=list)
    empty_states: np.ndarray | None = None
    scheduler_config: dict = field(default_factory=dict)
    parent_lineage: dict = field(default_factory=dict)
    llm_stats: tuple[np.ndarray, np.ndarray] | None = None
    image_pool: list[str] | None = None  # stage 1 with distill_weight: training images to noise


# ----------------------------------------------------------------------------------- inputs


def resolve_model_ref(ref: str, what: str) -> Path:
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
    from omnidiff.tracking import is_model_ref

    if is_model_ref(ref):
        from omnidiff.tracking import TrackingError, resolve_model

        try:
            return Path(resolve_model(ref))
        except TrackingError as exc:
            raise TrainingError(f"{what}={ref!r}: {exc}") from None
    raise TrainingError(f"{what}={ref!r}: no such folder, and not a registry reference like "
                        "'omnidiff-tiny@candidate' or 'omnidiff-tiny/3'")


def open_snapshot(ref: str):
    from omnidiff.contracts.snapshot import Snapshot, latest_snapshot

    path = Path(ref).expanduser()
    return Snapshot.open(path if path.is_dir() else latest_snapshot(ref))


def cache_specs(cfg: TrainConfig, base: Path, llm_path: Path, unet_config: dict) -> dict[str, CacheSpec]:
    """The caches this stage reads, named from its encoders' settings as the embed stage names them."""
    kinds = ("llm", "clip") if cfg.family == "align" else ("llm", "pixels")
    specs = {"llm": llm_spec(llm_path, cfg.llm.layer, cfg.llm.max_length, cfg.llm.dtype)}
    if "clip" in kinds:
        specs["clip"] = clip_spec(base / "text_encoder", base / "tokenizer", cfg.align.clip_windows)
    if "pixels" in kinds:
        vae = base / "vae" if (base / "vae").is_dir() else None
        resolution = int(unet_config["sample_size"])
        if vae is not None:
            resolution *= vae_scale_factor(json.loads((vae / "config.json").read_text()))
        specs["pixels"] = pixels_spec(resolution, vae)
    return specs


def resolve_inputs(cfg: TrainConfig) -> StageInputs:
    """Steps 1-3 of the module docstring."""
    base = resolve_model_ref(cfg.base_model, "base_model")
    for sub in ("unet", "scheduler"):
        if not (base / sub).is_dir():
            raise TrainingError(f"base_model={cfg.base_model!r}: {base / sub} is missing (not a pipeline folder)")
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    out_dim = int(unet_config["cross_attention_dim"])
    init_from = resolve_model_ref(cfg.init_from, "init_from") if cfg.init_from else None
    parent_lineage = {}
    if init_from is not None:
        if not (init_from / "adapter").is_dir():
            raise TrainingError(f"init_from={cfg.init_from!r}: {init_from} has no adapter/ (not an llm_adapter export)")
        if (init_from / "lineage.json").is_file():
            parent_lineage = json.loads((init_from / "lineage.json").read_text())

    snapshot = open_snapshot(cfg.data.snapshot)
    llm_path = llm_folder(cfg.llm.path)
    stores: dict[str, Any] = {}
    for kind, spec in cache_specs(cfg, base, llm_path, unet_config).items():
        what = {"llm": "the configured LLM (llm.*)", "clip": f"the base model's text encoder ({base.name}, "
                f"{cfg.align.clip_windows} windows)", "pixels": f"the base model's image space ({spec.value_shape})"}[kind]
        stores[kind] = open_checked_cache(kind, spec.inputs, cfg.data.cache_root, what)
        if kind == "llm":
            llm_encoder_inputs = spec.inputs["encoder"]
    llm_dim = int(stores["llm"].hidden_size)
    if cfg.family == "align" and stores["clip"].hidden_size != out_dim:
        raise CacheMismatchError(f"CLIP cache hidden size {stores['clip'].hidden_size} != the base UNet's "
                                 f"cross_attention_dim {out_dim}")
    if init_from is not None:
        _check_parent(init_from, llm_encoder_inputs, llm_dim, out_dim)

    # -- examples
    pairs = snapshot.pairs(["caption", "lang", "caption_en", "split", "image_digest", "aesthetic"]).to_pandas()
    parallel = None
    if cfg.family == "align":
        if cfg.align.use_parallel and snapshot.shard_paths("parallel"):
            parallel = snapshot.parallel(["text", "lang", "text_en", "split"]).to_pandas()
        examples = align_examples(pairs, parallel, cfg.data.split)
        require_keys(stores["clip"], examples["target_key"].tolist(), "English-side texts")
    else:
        examples = diffusion_examples(pairs, cfg.data.split, cfg.data.aesthetic_min)
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
    image_pool = None
    llm_stats = None
    if init_from is None and cfg.adapter.input_norm:
        llm_stats = llm_state_stats(stores["llm"], examples["llm_key"].tolist())

    scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    inputs = StageInputs(base, init_from, snapshot, llm_path, llm_encoder_inputs, llm_dim, out_dim,
                         stores, examples, val_examples, scheduler_config=scheduler_config,
                         parent_lineage=parent_lineage, llm_stats=llm_stats, image_pool=image_pool)
    _prompt_states(cfg, inputs, pairs)
    return inputs


def with_empty_prompt(examples: pd.DataFrame, stores: dict, share: float) -> pd.DataFrame:
    """Stage-1 examples plus copies of ("" -> CLIP's ""), ``share`` of the result, when both caches hold "".

    Classifier-free guidance contrasts every prompt with the adapter's output for "", so that output
    must land where the base UNet's unconditional input (CLIP of "") is.
    """
    from omnidiff.contracts.keys import text_key

    key = text_key(EMPTY_PROMPT)
    if share <= 0 or key not in stores["llm"] or key not in stores["clip"]:
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
    states = store.read(chosen)
    total = np.zeros(store.hidden_size, dtype=np.float64)
    total_sq = np.zeros(store.hidden_size, dtype=np.float64)
    count = 0
    for key in chosen:
        x = np.asarray(states[key], dtype=np.float64)  # (L, D)
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
        count += x.shape[0]
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


def _check_parent(init_from: Path, llm_inputs: dict, llm_dim: int, out_dim: int) -> None:
    """The parent export must have been trained on the same LLM and for the same UNet width."""
    adapter_cfg = json.loads((init_from / "adapter" / "config.json").read_text())
    if adapter_cfg["llm_dim"] != llm_dim or adapter_cfg["out_dim"] != out_dim:
        raise TrainingError(f"init_from {init_from}: adapter maps {adapter_cfg['llm_dim']} -> {adapter_cfg['out_dim']}, "
                            f"but this stage needs {llm_dim} (LLM cache) -> {out_dim} (UNet)")
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
    from omnidiff.contracts.keys import text_key

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


# ----------------------------------------------------------------------------------- checkpoint folder


def identity(cfg: TrainConfig, inputs: StageInputs) -> dict:
    """What a checkpoint folder is the training of: the config minus run settings, plus its inputs."""
    resolved = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    resolved["data"] = {k: v for k, v in resolved["data"].items() if k != "cache_root"}
    return {
        "config": resolved,
        "snapshot_digest": inputs.snapshot.digest,
        "caches": {k: s.fingerprint for k, s in inputs.stores.items()},
        "base_model": _folder_digest(inputs.base_model / "unet"),
        "init_from": _folder_digest(inputs.init_from / "adapter") if inputs.init_from else None,
    }


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def check_checkpoint_folder(cfg: TrainConfig, ckpt_dir: Path, ident: dict) -> str | None:
    """The tag a run will resume from (None = fresh); refuses a folder of another training."""
    tag = latest_tag(ckpt_dir)
    path = ckpt_dir / IDENTITY_NAME
    if tag is None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ident, indent=1, sort_keys=True))
        return None
    if cfg.checkpoint.resume == "never":
        raise TrainingError(f"{ckpt_dir} already holds checkpoints (latest {tag}) and checkpoint.resume is 'never': "
                            "choose another name or checkpoint.dir, or delete the folder")
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(ident, sort_keys=True)):
            diffs = _diff_keys(saved, json.loads(json.dumps(ident)))
            raise TrainingError(
                f"{ckpt_dir} holds checkpoints of a different training (differs in: {', '.join(diffs[:6])}); "
                f"only {', '.join(RESUMABLE_CHANGES)} may change on resume. Use another name or checkpoint.dir."
            )
    return tag


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ----------------------------------------------------------------------------------- launch


def launch(cfg: TrainConfig, job: dict) -> None:
    """Run ``train_worker`` on every rank: a Ray Train job, or this process for ``dist.launcher: local``."""
    from train.loop import train_worker

    if cfg.dist.launcher == "local":
        train_worker(job)
        return
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from omnidiff.stack import ensure_ray

    # Ray Train 2.x also routes workers' print() through its logger, so every progress line would
    # reach the driver twice; the plain stdout stream is enough.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ensure_ray()
    resources = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": 1} if cfg.dist.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(subdir("ray_train")),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps the workers' tracebacks; keep them, name the stage
        raise TrainingError(f"training workers of {cfg.name!r} (stage {cfg.stage}) failed: {exc}") from exc


def build_job(cfg: TrainConfig, inputs: StageInputs, ckpt_dir: Path, run_id: str | None) -> dict:
    """Plain, picklable data every worker receives (Ray ships it to each rank)."""
    examples_path = ckpt_dir / "examples.parquet"
    tmp = examples_path.with_name(f".examples-{os.getpid()}.parquet")
    inputs.examples.to_parquet(tmp, index=False)
    os.replace(tmp, examples_path)
    val_path = None
    if inputs.val_examples is not None:
        val_path = ckpt_dir / "val_examples.parquet"
        inputs.val_examples.to_parquet(val_path, index=False)
    return {
        "config": to_dict(cfg),
        "val_examples": str(val_path) if val_path else None,
        "env": {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)},
        "examples": str(examples_path),
        "caches": {k: str(s.path) for k, s in inputs.stores.items()},
        "base_model": str(inputs.base_model),
        "init_from": str(inputs.init_from) if inputs.init_from else None,
        "llm_dim": inputs.llm_dim,
        "out_dim": inputs.out_dim,
        "empty_states": inputs.empty_states,
        "llm_stats": inputs.llm_stats,
        "image_pool": inputs.image_pool,
        "prompts": inputs.prompts,
        "sampling_scheduler": inputs.scheduler_config,
        "checkpoint_dir": str(ckpt_dir),
        "final_dir": str(ckpt_dir / "final"),
        "result_path": str(ckpt_dir / "result.json"),
        "mlflow_run_id": run_id,
    }


def registry_ref(ref: str | None, folder_run_id: str | None, tracked: bool) -> str | None:
    """``name/version`` of a model given as a registry reference, or of the version its run registered.

    The lineage query (flows/lineage.py) walks ``parent_model`` tags as registry references, so a
    parent given as a folder (the pipeline passes export folders) is traced to its version through
    the MLflow run that produced it (``lineage.json``'s ``run_id``). None when it was never registered.
    """
    if not ref or not tracked:
        return None
    from omnidiff import tracking

    if not Path(ref).expanduser().exists() and tracking.is_model_ref(ref):
        version = tracking.model_version(ref)
        return f"{version.name}/{version.version}"
    if folder_run_id:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking.tracking_uri())
        versions = client.search_model_versions(f"run_id = '{folder_run_id}'")
        if versions:
            newest = max(versions, key=lambda v: int(v.version))
            return f"{newest.name}/{newest.version}"
    return None


def lineage(cfg: TrainConfig, inputs: StageInputs, run_id: str | None) -> dict:
    """``lineage.json`` of the export: the run, its inputs, and the parent's lineage one level up."""
    base_lineage = {}
    if (inputs.base_model / "lineage.json").is_file():
        base_lineage = json.loads((inputs.base_model / "lineage.json").read_text())
    parent = None
    if inputs.init_from is not None:
        parent_run = inputs.parent_lineage.get("run_id")
        parent = {"ref": cfg.init_from, "path": str(inputs.init_from), "run_id": parent_run,
                  "stage": inputs.parent_lineage.get("stage"),
                  "model": registry_ref(cfg.init_from, parent_run, cfg.track)}
    return {
        "stage": cfg.stage,
        "name": cfg.name,
        "run_id": run_id,
        "snapshot": {"name": inputs.snapshot.name, "digest": inputs.snapshot.digest, "path": str(inputs.snapshot.path)},
        "caches": {k: s.fingerprint for k, s in inputs.stores.items()},
        "llm": inputs.llm_encoder_inputs,
        "base_model": {"ref": cfg.base_model, "path": str(inputs.base_model), "run_id": base_lineage.get("run_id"),
                       "model": registry_ref(cfg.base_model, base_lineage.get("run_id"), cfg.track)},
        "parent": parent,
        "examples": len(inputs.examples),
    }


def _log_inputs(cfg: TrainConfig, inputs: StageInputs, lin: dict) -> None:
    import mlflow
    import mlflow.data

    from omnidiff import tracking

    mlflow.set_tags({"snapshot_digest": inputs.snapshot.digest, "parent_model": cfg.init_from or cfg.base_model,
                     "parent_run_id": (lin.get("parent") or {}).get("run_id") or "",
                     **{f"cache_fingerprint.{k}": s.fingerprint for k, s in inputs.stores.items()}})
    dataset = mlflow.data.from_pandas(inputs.examples, source=str(inputs.snapshot.path),
                                      name=f"{inputs.snapshot.name}@{inputs.snapshot.digest[:12]}")
    mlflow.log_input(dataset, context=f"train-stage{cfg.stage}")
    mlflow.log_params({"examples": len(inputs.examples), "snapshot_digest": inputs.snapshot.digest,
                       **{f"cache_fingerprint.{k}": s.fingerprint for k, s in inputs.stores.items()}})
    tracking.log_json(lin, "lineage.json")


def log_curves(run_id: str, title: str) -> None:
    """A loss-curve picture (train loss and val loss by step) beside the metrics, for reports and the UI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    from omnidiff import tracking

    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "val_loss"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], marker="o", markersize=3, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    tracking.log_figure(fig, "curves/loss.png", run_id=run_id)
    plt.close(fig)


def run(cfg: TrainConfig) -> dict:
    """Train one stage end to end; returns ``{export_dir, run_id, model_version, final_step, loss, ...}``."""
    import contextlib

    from omnidiff import tracking

    inputs = resolve_inputs(cfg)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else subdir("checkpoints") / cfg.name
    resume_tag = check_checkpoint_folder(cfg, ckpt_dir, identity(cfg, inputs))
    export_dir = Path(cfg.registry.export_dir) if cfg.registry.export_dir else subdir("exports") / cfg.name
    result_path = ckpt_dir / "result.json"
    result_path.unlink(missing_ok=True)

    tags = {"train.name": cfg.name, "resumed_from": resume_tag or ""}
    context = (tracking.start_run(f"train-stage{cfg.stage}", config=cfg, run_name=cfg.name, tags=tags)
               if cfg.track else contextlib.nullcontext())
    with context as mlrun:
        run_id = mlrun.info.run_id if mlrun is not None else None
        lin = lineage(cfg, inputs, run_id)
        if run_id:
            _log_inputs(cfg, inputs, lin)
        print(f"[train] stage {cfg.stage} '{cfg.name}': {len(inputs.examples)} examples, "
              f"{cfg.dist.num_workers} worker(s), checkpoints in {ckpt_dir}"
              + (f", resuming from {resume_tag}" if resume_tag else ""), flush=True)
        t0 = time.perf_counter()
        launch(cfg, build_job(cfg, inputs, ckpt_dir, run_id))
        wall = time.perf_counter() - t0
        if not result_path.is_file():
            raise TrainingError(f"training of {cfg.name!r} ended without a result ({result_path} missing)")
        result = json.loads(result_path.read_text())

        from omnidiff.models.llm import LLMTextEncoder
        from train.export import export_pipeline

        llm = LLMTextEncoder(inputs.llm_path, layer=cfg.llm.layer, max_length=cfg.llm.max_length, dtype=cfg.llm.dtype)
        export_pipeline(export_dir, Path(result["final_dir"]), inputs.base_model, llm, lin)
        del llm
        version = None
        if run_id:
            import mlflow

            mlflow.log_metrics({"wall_s": wall, "final_loss": result["loss"],
                                "train_samples_per_s": result["samples_per_s"]})
            log_curves(run_id, f"{cfg.name}: stage {cfg.stage}")
            if cfg.registry.register:
                from train.registry import register_export

                aliases = [cfg.registry.alias] + ([f"stage{cfg.stage}"] if cfg.registry.stage_alias else [])
                version = register_export(export_dir, cfg.registry.model_name, aliases, lin, run_id)
    print(f"[train] stage {cfg.stage} '{cfg.name}' done: loss {result['loss']:.5f}, export {export_dir}"
          + (f", registered {cfg.registry.model_name} v{version} @{cfg.registry.alias}" if version else ""), flush=True)
    return {**result, "export_dir": str(export_dir), "run_id": run_id, "model_version": version,
            "model_ref": f"{cfg.registry.model_name}/{version}" if version else str(export_dir),
            "checkpoint_dir": str(ckpt_dir), "wall_s": wall}
