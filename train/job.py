"""``TrainJob``: what every training worker receives, typed and frozen (the driver builds it once).

Plain, picklable data: Ray ships it to each rank. Paths are strings so a job is the same on any
node; the example tables travel as Parquet files in the checkpoint folder, not inside the job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnidiff.contracts.storage import S3Settings, is_remote, open_folder
from train.config import TrainConfig
from train.inputs import StageInputs

# Environment a Ray worker needs to see the same home, caches and tracking server as the driver.
WORKER_ENV = ("OMNIDIFF_HOME", "OMNIDIFF_MODELS", "MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR", "HF_HOME",
              "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "PYTHONWARNINGS")


@dataclass(frozen=True)
class TrainJob:
    """One training stage as its workers see it.

    config: the stage's config. env: environment variables set in each worker first (WORKER_ENV).
    examples / val_examples: Parquet example tables (train.data). caches: ``{kind: cache folder}``.
    base_model / init_from: pipeline folders (init_from: the parent stage's export, or None).
    llm_dim / out_dim: the adapter's input (LLM hidden size) and output (UNet cross-attention) widths;
    pooled_dim: its pooled head's width (SDXL's text_embeds, else out_dim).
    empty_states: the LLM states of "" ``(L, Dl)`` (caption dropout, the sampler's unconditional input).
    llm_stats: per-dimension (mean, std) of the LLM states for a fresh adapter's ``input_norm``.
    prompts: the sample prompt set, ``[{prompt, lang, group, states (L, Dl)}]``.
    sampling_scheduler: the base model's scheduler config (for sample grids).
    checkpoint_dir / final_dir / result_path: where ranks checkpoint, rank 0 writes the final
    weights, and rank 0 writes ``result.json``. mlflow_run_id: the driver's run (None: untracked).
    checkpoint_url: the checkpoint prefix on object storage (None: ``checkpoint_dir`` is the checkpoint
    folder itself); ``checkpoint_dir`` is then each machine's local work folder, and the examples, the
    final weights and ``result.json`` travel through the prefix (train/checkpoint.py).
    storage: the driver's resolved S3 settings (endpoint, credentials), for caches and checkpoints.
    """

    config: TrainConfig
    env: dict[str, str]
    examples: str
    val_examples: str | None
    caches: dict[str, str]
    base_model: str
    init_from: str | None
    llm_dim: int
    out_dim: int
    pooled_dim: int
    empty_states: np.ndarray
    llm_stats: tuple[np.ndarray, np.ndarray] | None
    prompts: list[dict]
    sampling_scheduler: dict
    checkpoint_dir: str
    final_dir: str
    result_path: str
    mlflow_run_id: str | None
    checkpoint_url: str | None = None
    storage: S3Settings | None = None

    def remote(self):
        """The checkpoint prefix as a :class:`~omnidiff.contracts.storage.Folder`, or None for a local folder."""
        return open_folder(self.checkpoint_url, self.storage) if self.checkpoint_url else None


def build_job(cfg: TrainConfig, inputs: StageInputs, ckpt_dir: Path, run_id: str | None,
              checkpoint_url: str | None = None, storage: S3Settings | None = None) -> TrainJob:
    """The job of ``cfg`` over ``inputs``; writes the example tables into ``ckpt_dir`` (and, with a
    ``checkpoint_url``, uploads them there: the ranks may run on machines that cannot see ``ckpt_dir``)."""
    examples_path = ckpt_dir / "examples.parquet"
    tmp = examples_path.with_name(f".examples-{os.getpid()}.parquet")
    inputs.examples.to_parquet(tmp, index=False)
    os.replace(tmp, examples_path)
    val_path = None
    if inputs.val_examples is not None:
        val_path = ckpt_dir / "val_examples.parquet"
        inputs.val_examples.to_parquet(val_path, index=False)
    examples, val = str(examples_path), str(val_path) if val_path else None
    if checkpoint_url is not None and is_remote(checkpoint_url):
        remote = open_folder(checkpoint_url, storage)
        remote.upload(examples_path, examples_path.name)
        examples = remote.url_of(examples_path.name)
        if val_path is not None:
            remote.upload(val_path, val_path.name)
            val = remote.url_of(val_path.name)
    return TrainJob(
        config=cfg,
        env={k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)},
        examples=examples,
        val_examples=val,
        caches={k: str(s.path) for k, s in inputs.stores.items()},
        base_model=str(inputs.base_model),
        init_from=str(inputs.init_from) if inputs.init_from else None,
        llm_dim=inputs.llm_dim,
        out_dim=inputs.out_dim,
        pooled_dim=inputs.pooled_dim,
        empty_states=inputs.empty_states,
        llm_stats=inputs.llm_stats,
        prompts=inputs.prompts,
        sampling_scheduler=inputs.scheduler_config,
        checkpoint_dir=str(ckpt_dir),
        final_dir=str(ckpt_dir / "final"),
        result_path=str(ckpt_dir / "result.json"),
        mlflow_run_id=run_id,
        checkpoint_url=checkpoint_url,
        storage=storage,
    )
