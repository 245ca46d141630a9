"""Every YAML shipped under configs/ (configs/gpu/ included) loads, validates and round-trips
(issue 2, section 2; issue 14), and ``omnidiff config check`` accepts it.

    .venv/bin/pytest tests/test_configs_shipped.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from omnidiff import config as cfg_lib

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


def test_configs_are_shipped():
    assert CONFIGS, "configs/*.yaml: nothing shipped"
    assert any(p.parent.name == "gpu" for p in CONFIGS), "configs/gpu/*.yaml are loaded too"


@pytest.mark.parametrize("path", CONFIGS, ids=[_id(p) for p in CONFIGS])
def test_shipped_config_loads_and_validates(path: Path):
    kind = yaml.safe_load(path.read_text(encoding="utf-8")).get("kind")
    assert kind in cfg_lib.CONFIG_KINDS, f"{path.name}: kind={kind!r} is not registered in CONFIG_KINDS"
    cfg = cfg_lib.load_any(path)
    cls = cfg_lib.config_class(kind)
    assert type(cfg) is cls and cls.kind == kind
    assert isinstance(cfg, cfg_lib.ConfigModel) and cls.model_config["frozen"], f"{cls.__name__} must be frozen"
    assert cls.model_config["extra"] == "forbid", f"{cls.__name__} must refuse unknown keys"
    # The resolved config (what MLflow logs) rebuilds the same object.
    plain = cfg_lib.to_dict(cfg)
    assert plain["kind"] == kind
    assert cfg_lib.from_dict(cls, {k: v for k, v in plain.items() if k != "kind"}) == cfg


def test_config_check_accepts_every_shipped_yaml(capsys):
    """``omnidiff config check`` over every YAML in configs/, as `make test` and CI run it."""
    from omnidiff.config import main

    assert main(["check", *map(str, CONFIGS)]) == 0
    out = capsys.readouterr().out
    for path in CONFIGS:
        assert f"# {path}: valid" in out


def test_config_check_names_the_bad_key_and_value(tmp_path, capsys):
    from omnidiff.config import main

    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "serve.yaml").read_text() + "port: 70000\n")
    good = REPO / "configs" / "serve.yaml"
    assert main(["check", str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"# {good}: valid" in captured.out
    assert f"{bad}: port=70000: must be <= 65535" in captured.err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("kind: embed\nnum_actorz: 2\n")
    assert main(["check", str(unknown)]) == 1
    assert "num_actorz=2: unknown key for EmbedConfig" in capsys.readouterr().err
