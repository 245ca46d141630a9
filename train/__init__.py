"""Training: the three OmniDiffusion stages with DeepSpeed on Ray Train, over the embedding cache.

    omnidiff train --config configs/train_stage1.yaml      # or: from train import run; run(cfg)

``run(cfg: TrainConfig) -> dict`` (export dir, MLflow run id, registered model version) is the
entry point. train.launch is the driver (train.inputs resolves what it reads, train.identity guards
the checkpoint folder, train.lineage records to MLflow); train.job is what each worker receives;
train.loop the per-rank loop over train.model (the one module builder), train.engine (DeepSpeed,
LR, EMA), train.checkpoint, train.losses (the two loss families) and train.data (the cached
batches); train.samples the grids; train.export / train.registry the output.
"""

from __future__ import annotations

from typing import Any


def run(cfg: Any) -> dict:
    """Train one stage (``cfg.stage``): see train.launch.run."""
    from train.launch import run as _run

    return _run(cfg)


__all__ = ["run"]
