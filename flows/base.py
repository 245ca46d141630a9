"""Prefect flow that prepares what the pipeline stands on: the tiny world, the base model, the evaluator.

    python -m flows.base configs/base.yaml

Each piece is cached on disk (world by its config digest, base model and evaluator by config + world
digest), so this flow costs seconds once they exist.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, task

from omnidiff.base.config import BaseConfig
from omnidiff.world.config import WorldConfig


@task(name="generate-world")
def generate_world_task(cfg: WorldConfig) -> str:
    from omnidiff.world import generate_world

    return str(generate_world(cfg))


@task(name="pretrain-base")
def pretrain_base_task(cfg: BaseConfig) -> str:
    from omnidiff.base.pretrain import pretrain

    return str(pretrain(cfg))


@task(name="train-evaluator")
def evaluator_task(cfg: BaseConfig) -> str:
    from omnidiff.base.evaluator_train import train_evaluator

    return str(train_evaluator(cfg))


@flow(name="prepare-base", log_prints=True)
def prepare_base_flow(base: BaseConfig, world: WorldConfig | None = None, build_base: bool = True) -> dict[str, Any]:
    """World (when given) -> base model + evaluator on that world; returns their folders. With
    ``build_base=False`` (the pipeline's ``base_model`` names a published folder) no tiny base is built."""
    from omnidiff.config import replace
    from omnidiff.stack import apply_env

    apply_env()
    world_dir = None
    if world is not None:
        world_dir = generate_world_task(world)
        base = replace(base, world_dir=Path(world_dir))
    return {"world_dir": world_dir or (str(base.world_dir) if base.world_dir else None),
            "base_model": pretrain_base_task(base) if build_base else None, "evaluator": evaluator_task(base)}


if __name__ == "__main__":
    from omnidiff.config import load_config

    print(prepare_base_flow(load_config(BaseConfig, sys.argv[1] if len(sys.argv) > 1 else "configs/base.yaml")))
