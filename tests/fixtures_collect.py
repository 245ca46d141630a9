"""Session fixtures of the collect stage (loaded as a pytest plugin by conftest).

    .venv/bin/pytest tests/test_collect_e2e.py -x -q

``tiny_snapshot``: the ``tiny_world`` collected for real: its url list points at
``world_server`` on 127.0.0.1, img2dataset downloads and resizes the images to
16x16 (configs/collect_test.yaml: 3 download shards, 3 pair shards, 20% val), and
the stage writes the pair snapshot under the session's $OMNIDIFF_HOME. Not
logged to MLflow (no stack needed); tests that want the MLflow side run the stage
again over the same lists, which downloads nothing and lands in the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COLLECT_TEST_CONFIG = REPO / "configs" / "collect_test.yaml"


def collect_test_config(url_lists, parallel_lists=(), overrides=()):
    """configs/collect_test.yaml with the given lists and dotted overrides."""
    from data_prep.config import CollectConfig
    from omnidiff.config import load_config

    lists = [f"url_lists={json.dumps([str(p) for p in url_lists])}",
             f"parallel_lists={json.dumps([str(p) for p in parallel_lists])}"]
    return load_config(CollectConfig, COLLECT_TEST_CONFIG, lists + list(overrides))


@pytest.fixture(scope="session")
def tiny_world_lists(tiny_world: Path, world_server: str, tmp_path_factory) -> tuple[Path, Path]:
    """(url list served by ``world_server``, the world's parallel texts)."""
    from omnidiff.world import write_url_list

    url_list = write_url_list(tiny_world, world_server, out_path=tmp_path_factory.mktemp("lists") / "urls.parquet")
    return url_list, tiny_world / "parallel.parquet"


@pytest.fixture(scope="session")
def tiny_snapshot(tiny_world_lists: tuple[Path, Path]) -> Path:
    """Folder of the tiny world's pair snapshot (collected through img2dataset from the local server)."""
    from data_prep.collect import run

    url_list, parallel_list = tiny_world_lists
    return run(collect_test_config([url_list], [parallel_list]))
