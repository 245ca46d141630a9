"""Session fixtures of the tiny world: ``tiny_world`` (a generated world folder) and ``world_server``.

    .venv/bin/pytest tests/test_world.py -x -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORLD_TEST_CONFIG = REPO / "configs" / "world_test.yaml"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world of configs/world_test.yaml (150 images), generated once per session under a tmp dir."""
    from omnidiff.config import load_config
    from omnidiff.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world") / "tiny"
    cfg = load_config(WorldConfig, WORLD_TEST_CONFIG, [f"out_dir={out}"])
    return generate_world(cfg)


@pytest.fixture(scope="session")
def world_server(tiny_world: Path):
    """Base url (``http://127.0.0.1:<port>``) of serve_world over ``tiny_world``, for the whole session."""
    from omnidiff.world import serve_world

    with serve_world(tiny_world) as base_url:
        yield base_url
