"""Prefect flows of the training stage: one per stage, plus ``train`` that runs whichever stage its config names.

    python -m flows.training configs/train_stage1.yaml [dotted.key=value ...]

Only wiring: each flow calls ``train.run(cfg)`` in a task. The task retries once: a retry resumes
from the stage's latest DeepSpeed checkpoint (train.checkpoint), so a crash costs the steps since then.
A flow left without a config uses the shipped ``configs/train_stage<N>.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, task

from train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@task(name="train-stage", retries=1, retry_delay_seconds=10)
def train_task(cfg: TrainConfig) -> dict[str, Any]:
    from train.launch import run  # the submodule: an old editable install may map `train` as a namespace

    return run(cfg)


def _stage_config(cfg: TrainConfig | None, stage: int) -> TrainConfig:
    from omnidiff.config import load_config

    cfg = cfg if cfg is not None else load_config(TrainConfig, CONFIGS / f"train_stage{stage}.yaml")
    if cfg.stage != stage:
        raise ValueError(f"stage={cfg.stage}: this flow runs stage {stage}; use the 'train' flow for any stage")
    return cfg


@flow(name="train", log_prints=True)
def train_flow(cfg: TrainConfig) -> dict[str, Any]:
    """Train the stage ``cfg.stage`` names; returns export dir, MLflow run id, model version."""
    from omnidiff.stack import apply_env

    apply_env()
    return train_task(cfg)


@flow(name="train-stage1", log_prints=True)
def train_stage1(cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Stage 1, multilingual alignment: the adapter against cached CLIP states."""
    return train_flow(_stage_config(cfg, 1))


@flow(name="train-stage2", log_prints=True)
def train_stage2(cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Stage 2, end to end: adapter + UNet on cached pixels."""
    return train_flow(_stage_config(cfg, 2))


@flow(name="train-stage3", log_prints=True)
def train_stage3(cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Stage 3, high-aesthetic fine-tune."""
    return train_flow(_stage_config(cfg, 3))


if __name__ == "__main__":
    from omnidiff.config import load_config

    print(train_flow(load_config(TrainConfig, sys.argv[1], sys.argv[2:])))
