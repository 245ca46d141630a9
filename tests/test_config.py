"""The config machinery (omnidiff/config.py): typed, frozen, validated, YAML + dotted overrides.

    .venv/bin/pytest tests/test_config.py -x -q
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import Field, ValidationError

from omnidiff import config as cfg_lib
from omnidiff.config import ConfigError, ConfigModel, from_dict, load_any, load_config


class DownloadSection(ConfigModel):
    """``processes``: worker processes (>= 1); ``timeout_s``: seconds per image."""

    processes: int = Field(2, ge=1)
    timeout_s: float = 10.0


class DemoConfig(ConfigModel):
    """A stage config with every kind of field the machinery supports."""

    kind: ClassVar[str] = "demo"
    name: str = "tiny"
    mode: Literal["fast", "slow"] = "fast"
    out_dir: Path = Path("out")
    seed: int | None = None
    resolution: tuple[int, int] = (16, 16)
    languages: tuple[str, ...] = ("en", "zh")
    weights: dict[str, float] = Field(default_factory=dict)
    verbose: bool = False
    download: DownloadSection = Field(default_factory=DownloadSection)


class NeedsName(ConfigModel):
    """``name`` is required."""

    name: str


def _yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_full_mapping():
    assert from_dict(DemoConfig, {}) == DemoConfig()
    cfg = from_dict(DemoConfig, {
        "name": "x", "mode": "slow", "out_dir": "a/b", "seed": 3, "resolution": [32, 32],
        "languages": ["de"], "weights": {"en": 1}, "verbose": True, "download": {"processes": 4},
    })
    assert cfg.out_dir == Path("a/b") and isinstance(cfg.out_dir, Path)
    assert cfg.resolution == (32, 32) and isinstance(cfg.resolution, tuple)
    assert cfg.languages == ("de",)
    assert cfg.weights == {"en": 1.0} and isinstance(cfg.weights["en"], float)  # int -> float is lossless
    assert cfg.download == DownloadSection(processes=4, timeout_s=10.0)


def test_configs_are_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        DemoConfig().name = "y"  # type: ignore[misc]


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"^nmae='x': unknown key for DemoConfig; valid keys: \[.*'name'"):
        from_dict(DemoConfig, {"nmae": "x"})


def test_unknown_nested_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"^download\.procs=4: unknown key for DownloadSection"):
        from_dict(DemoConfig, {"download": {"procs": 4}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"seed": "three"}, r"seed='three': expected an integer"),
        ({"seed": True}, r"seed=True: expected an integer"),  # a bool is not an int here
        ({"name": 5}, r"name=5: expected a string"),
        ({"verbose": "yes"}, r"verbose='yes': expected true or false"),
        ({"download": {"timeout_s": "ten"}}, r"download\.timeout_s='ten': expected a number"),
        ({"download": {"processes": 2.5}}, r"download\.processes=2\.5: expected an integer"),
        ({"languages": ["en", 3]}, r"languages\[1\]=3: expected a string"),
        ({"weights": {"en": "heavy"}}, r"weights\.en='heavy': expected a number"),
        ({"download": 3}, r"download=3: expected a mapping"),
        ({"out_dir": 7}, r"out_dir=7: expected a path"),
    ],
)
def test_wrong_type_names_key_and_value(data, message):
    with pytest.raises(ConfigError, match="^" + message):
        from_dict(DemoConfig, data)


def test_literal_lists_the_allowed_values():
    assert from_dict(DemoConfig, {"mode": "slow"}).mode == "slow"
    with pytest.raises(ConfigError, match=r"^mode='medium': must be one of \['fast', 'slow'\]"):
        from_dict(DemoConfig, {"mode": "medium"})


def test_optional_accepts_none_and_checks_the_rest():
    assert from_dict(DemoConfig, {"seed": None}).seed is None
    assert from_dict(DemoConfig, {"seed": 7}).seed == 7
    with pytest.raises(ConfigError, match=r"^seed=1\.5: expected an integer"):
        from_dict(DemoConfig, {"seed": 1.5})


def test_tuples_check_length_and_items():
    with pytest.raises(ConfigError, match=r"^resolution=\[16, 16, 3\]: expected 2 items"):
        from_dict(DemoConfig, {"resolution": [16, 16, 3]})
    with pytest.raises(ConfigError, match=r"^resolution\[0\]='16': expected an integer"):
        from_dict(DemoConfig, {"resolution": ["16", 16]})
    with pytest.raises(ConfigError, match=r"^languages='en': expected a list"):
        from_dict(DemoConfig, {"languages": "en"})


def test_bound_validation_names_key_and_value():
    with pytest.raises(ConfigError, match=r"^download\.processes=0: must be >= 1"):
        from_dict(DemoConfig, {"download": {"processes": 0}})
    # Built directly, a section names its keys relative to itself; inside a config, with its path.
    with pytest.raises(ConfigError, match=r"^processes=-1: must be >= 1"):
        DownloadSection(processes=-1)
    with pytest.raises(ConfigError, match=r"^download\.processes=-1: must be >= 1"):
        DemoConfig(download={"processes": -1})


def test_missing_required_field_is_an_error():
    with pytest.raises(ConfigError, match="name"):
        from_dict(NeedsName, {})


def test_yaml_with_dotted_overrides(tmp_path):
    path = _yaml(tmp_path, "kind: demo\nname: from-yaml\ndownload:\n  processes: 3\n  timeout_s: 5\n")
    cfg = load_config(DemoConfig, path, ["download.processes=8", "resolution=[8, 8]", "seed=null", "mode=slow"])
    assert cfg.name == "from-yaml"
    assert cfg.download == DownloadSection(processes=8, timeout_s=5.0)  # sibling kept from YAML
    assert cfg.resolution == (8, 8) and cfg.seed is None and cfg.mode == "slow"
    # Overrides alone (no file) start from the defaults.
    assert load_config(DemoConfig, None, ["name=only"]) == DemoConfig(name="only")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 3e-3 as a string; a float field takes it (and still refuses words)."""
    path = _yaml(tmp_path, "kind: demo\ndownload:\n  timeout_s: 1e2\n")
    assert load_config(DemoConfig, path).download.timeout_s == 100.0
    assert load_config(DemoConfig, None, ["download.timeout_s=3e-3"]).download.timeout_s == 0.003
    with pytest.raises(ConfigError, match=r"download\.timeout_s='3e': expected a number"):
        load_config(DemoConfig, None, ["download.timeout_s=3e"])


def test_bad_overrides_are_named():
    with pytest.raises(ConfigError, match=r"override 'download\.processes': expected dotted\.key=value"):
        load_config(DemoConfig, None, ["download.processes"])
    with pytest.raises(ConfigError, match=r"^download\.processes='many': expected an integer"):
        load_config(DemoConfig, None, ["download.processes=many"])
    with pytest.raises(ConfigError, match=r"^download\.bogus=1: unknown key"):
        load_config(DemoConfig, None, ["download.bogus=1"])
    with pytest.raises(ConfigError, match="set both as a value and a section"):
        cfg_lib.parse_overrides(["a=1", "a.b=2"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DemoConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DemoConfig, _yaml(tmp_path, "name: [unclosed\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(DemoConfig, _yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match=r"kind='world': .* expected 'demo'"):
        load_config(DemoConfig, _yaml(tmp_path, "kind: world\n", "other.yaml"))


def test_load_any_needs_a_known_kind(tmp_path):
    with pytest.raises(ConfigError, match="missing top-level 'kind'"):
        load_any(_yaml(tmp_path, "name: x\n", "nokind.yaml"))
    with pytest.raises(ConfigError, match=r"kind='no-such-kind': unknown config kind"):
        load_any(_yaml(tmp_path, "kind: no-such-kind\n", "unknown.yaml"))


def test_to_dict_flatten_and_yaml_round_trip(tmp_path):
    cfg = from_dict(DemoConfig, {"out_dir": "x/y", "weights": {"en": 2}, "download": {"processes": 5}})
    plain = cfg_lib.to_dict(cfg)
    assert plain["kind"] == "demo" and plain["out_dir"] == "x/y" and plain["resolution"] == [16, 16]
    flat = cfg_lib.flatten(plain)
    assert flat["download.processes"] == 5 and flat["weights.en"] == 2.0
    assert load_config(DemoConfig, _yaml(tmp_path, cfg_lib.dump_yaml(cfg), "dump.yaml")) == cfg


def test_replace_revalidates():
    cfg = DemoConfig()
    assert cfg_lib.replace(cfg, name="z").name == "z"
    with pytest.raises(ConfigError, match=r"^processes=0: must be >= 1"):
        cfg_lib.replace(cfg.download, processes=0)
    with pytest.raises(ConfigError, match=r"^download\.processes=0: must be >= 1"):
        cfg_lib.replace(cfg, download={"processes": 0})
    with pytest.raises(ConfigError, match=r"^nmae='z': unknown key for DemoConfig"):
        cfg_lib.replace(cfg, nmae="z")
