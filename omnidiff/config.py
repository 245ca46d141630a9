"""Typed, frozen stage configs loaded from YAML with dotted CLI overrides.

Each stage owns one frozen dataclass (``CollectConfig`` in data_prep/config.py,
``EmbedConfig`` in embed_cache/config.py, ...). This module is the machinery:

    cfg = load_config(CollectConfig, "configs/collect.yaml", ["download.processes=4"])

* YAML keys must be fields of the dataclass (nested dataclasses are nested
  mappings, or the path of the nested config's own YAML); an unknown key is an
  error that names it.
* Values are checked against the field's annotation (int, float, str, bool,
  Path, Literal, Optional, tuple[...] / list[...], dict, nested dataclass) and
  coerced where lossless (an int where a float is expected, a str for a Path).
* ``__post_init__`` validation should call :func:`require` so that errors name
  the key and the bad value.
* :func:`to_dict` gives the resolved config, which is what MLflow logs and what
  a Prefect flow takes as its typed parameter.

A shipped YAML names its dataclass with a top-level ``kind`` key; the registry
:data:`CONFIG_KINDS` maps kinds to classes so ``tests/test_configs.py`` can load
and validate every file under ``configs/``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

# kind -> "module:Class". Stages register their config class here.
CONFIG_KINDS: dict[str, str] = {
    "world": "omnidiff.world.config:WorldConfig",
    "base": "omnidiff.base.config:BaseConfig",
    "collect": "data_prep.config:CollectConfig",
    "embed": "embed_cache.config:EmbedConfig",
    "train": "train.config:TrainConfig",
    "evaluate": "train.eval_config:EvalConfig",
    "serve": "serve.config:ServeConfig",
    "pipeline": "flows.config:PipelineConfig",
}


_FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key and the value."""


def require(condition: bool, key: str, value: Any, why: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``value`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r}: {why}")


def config_class(kind: str) -> type:
    """The dataclass registered for ``kind``."""
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"kind={kind!r}: unknown config kind; known: {sorted(CONFIG_KINDS)}")
    module_name, _, class_name = CONFIG_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        dotted, _, raw = item.partition("=")
        dotted = dotted.strip()
        if not dotted:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = nested
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set both as a value and a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file plus dotted overrides (defaults fill the rest)."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    kind = data.pop("kind", None)
    expected = getattr(cls, "kind", None)
    if kind is not None and expected is not None and kind != expected:
        raise ConfigError(f"kind={kind!r}: file {str(path)!r} is a {kind!r} config, expected {expected!r}")
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def load_any(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """Load a YAML whose top-level ``kind`` names its class."""
    data = read_yaml(path)
    if "kind" not in data:
        raise ConfigError(f"config file {str(path)!r}: missing top-level 'kind' (one of {sorted(CONFIG_KINDS)})")
    return load_config(config_class(data["kind"]), path, overrides)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}={data!r}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}={data[unknown[0]]!r}: unknown key for {cls.__name__}; "
            f"valid keys: {sorted(fields)}"
        )
    hints = get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: does not match {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        require(value in allowed, key, value, f"must be one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, (str, Path)) and str(value).endswith((".yaml", ".yml")):
            # A nested config may be given as the path of its own YAML (configs/pipeline.yaml does).
            nested = read_yaml(value)
            nested_kind = nested.pop("kind", None)
            expected = getattr(tp, "kind", None)
            require(nested_kind in (None, expected), key, str(value), f"is a {nested_kind!r} config, expected {expected!r}")
            return from_dict(tp, nested, key + ".")
        return from_dict(tp, value, key + ".")
    if origin in (tuple, list):
        require(isinstance(value, (list, tuple)), key, value, "expected a list")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            require(len(value) == len(args), key, value, f"expected {len(args)} items")
            items = [_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
        else:
            item_type = args[0] if args else Any
            items = [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        require(isinstance(value, dict), key, value, "expected a mapping")
        args = get_args(tp)
        if args:
            return {_coerce(args[0], k, f"{key}.{k}"): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        require(isinstance(value, bool), key, value, "expected true or false")
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "3e-3" (no dot) as a string; it is a number here
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "expected a number")
        return float(value)
    if tp is str:
        require(isinstance(value, str), key, value, "expected a string")
        return value
    if tp is Path:
        require(isinstance(value, (str, Path)), key, value, "expected a path")
        return Path(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-safe data (Paths become strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    out = plain(cfg)
    kind = getattr(type(cfg), "kind", None)
    if kind:
        out = {"kind": kind, **out}
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for ``mlflow.log_params``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-runs validation."""
    return dataclasses.replace(cfg, **changes)


__all__ = [
    "CONFIG_KINDS",
    "ConfigError",
    "config_class",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_any",
    "load_config",
    "parse_overrides",
    "replace",
    "require",
    "to_dict",
    "typing",
]
