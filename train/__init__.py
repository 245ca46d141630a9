"""Training: the three OmniDiffusion stages with DeepSpeed on Ray Train, over the embedding cache.

    omnidiff train --config configs/train_stage1.yaml      # or: from train import run; run(cfg)

``run(cfg: TrainConfig) -> dict`` (export dir, MLflow run id, registered model version) is the
entry point; train.ray_job is the driver, train.loop the per-rank loop, train.losses the two loss
families, train.data the cached batches, train.export / train.registry the output.
"""

from __future__ import annotations

from typing import Any


def run(cfg: Any) -> dict:
    """Train one stage (``cfg.stage``): see train.ray_job.run."""
    from train.ray_job import run as _run

    return _run(cfg)


__all__ = ["run"]
