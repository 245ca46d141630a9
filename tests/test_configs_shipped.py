"""Every YAML shipped under configs/ loads, validates and round-trips (issue 2, section 2).

    .venv/bin/pytest tests/test_configs_shipped.py -q
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from omnidiff import config as cfg_lib

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert CONFIGS, "configs/*.yaml: nothing shipped"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads_and_validates(path: Path):
    kind = yaml.safe_load(path.read_text(encoding="utf-8")).get("kind")
    assert kind in cfg_lib.CONFIG_KINDS, f"{path.name}: kind={kind!r} is not registered in CONFIG_KINDS"
    cfg = cfg_lib.load_any(path)
    cls = cfg_lib.config_class(kind)
    assert type(cfg) is cls and cls.kind == kind
    assert dataclasses.is_dataclass(cfg) and cls.__dataclass_params__.frozen, f"{cls.__name__} must be frozen"
    # The resolved config (what MLflow logs) rebuilds the same object.
    plain = cfg_lib.to_dict(cfg)
    assert plain["kind"] == kind
    assert cfg_lib.from_dict(cls, {k: v for k, v in plain.items() if k != "kind"}) == cfg
