"""Session fixtures of the base model: ``tiny_base_model`` and ``tiny_evaluator`` (folders).

    .venv/bin/pytest tests/test_base.py -x -q

Both come from configs/base_test.yaml on the ``tiny_world`` fixture: a few pretraining steps and a
small evaluator, smoke-sized (they run, they are not faithful). Cached like the real ones under
``$OMNIDIFF_MODELS`` (kept between sessions by tests/conftest.py), keyed by config + world digest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_TEST_CONFIG = REPO / "configs" / "base_test.yaml"


def tiny_base_config(tiny_world: Path, *overrides: str):
    """configs/base_test.yaml pointed at ``tiny_world``, without MLflow, plus ``overrides``."""
    from omnidiff.base.config import BaseConfig
    from omnidiff.config import load_config

    return load_config(BaseConfig, BASE_TEST_CONFIG, [f"world_dir={tiny_world}", "track=false", *overrides])


@pytest.fixture(scope="session")
def tiny_base_model(tiny_world: Path) -> Path:
    """A pipeline folder (conditioning "clip") from a few pretraining steps on ``tiny_world``."""
    from omnidiff.base.pretrain import pretrain

    return pretrain(tiny_base_config(tiny_world))


@pytest.fixture(scope="session")
def tiny_evaluator(tiny_world: Path) -> Path:
    """An evaluator folder trained briefly at 16x16; load it with ``load_evaluator(path, require_fit=False)``."""
    from omnidiff.base.evaluator_train import train_evaluator

    return train_evaluator(tiny_base_config(tiny_world))
