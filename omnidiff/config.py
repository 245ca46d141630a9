"""Typed, frozen stage configs (pydantic v2 models) loaded from YAML with dotted CLI overrides.

A little over 400 lines: ~90 of them turn pydantic's errors into the project's own messages (the
dotted key, the value, why), which every stage's tests pin; the rest is loading and ``config check``.

Each stage owns one frozen model (``CollectConfig`` in data_prep/config.py, ``EmbedConfig`` in
embed_cache/config.py, ...), a :class:`ConfigModel`. This module loads them:

    cfg = load_config(CollectConfig, "configs/collect.yaml", ["download.processes=4"])

* Unknown keys are refused (``extra="forbid"``), bounds are ``Field`` constraints, choices are
  ``Literal``; a ``model_validator`` holds a rule between fields and reports it with
  :func:`require`, naming the key relative to its own model.
* YAML data is validated as pydantic validates JSON, strictly: no silent ``"3"`` -> 3 or
  ``"yes"`` -> true; a list becomes a tuple, a string a Path, an integer a float.
* Every error is a :class:`ConfigError` naming the dotted key and the value
  (``download.processes=0: must be >= 1``).
* :func:`to_dict` gives the resolved config (Paths as strings, tuples as lists): what MLflow
  logs, a Prefect flow's parameter, and what the pipeline's input digests hash.

A shipped YAML names its model with a top-level ``kind`` key; :data:`CONFIG_KINDS` maps kinds to
classes, so ``omnidiff config check FILE...`` and tests/test_configs_shipped.py load every file
under ``configs/``. A field whose type is a config may be given as the path of that config's own
YAML (configs/pipeline.yaml does).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, StringConstraints, TypeAdapter, ValidationError

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


# A string with at least one non-blank character.
NonBlank = Annotated[str, StringConstraints(pattern=r"\S")]


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key and the value."""


def require(condition: bool, key: str, value: Any, why: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``value`` unless ``condition`` holds.

    In a model validator ``key`` is relative to that model; the error gets the model's own path in
    front (``download.`` + ``encode_quality=95: ...``).
    """
    if not condition:
        raise ConfigError(f"{key}={value!r}: {why}")


class _ConfigMeta(type(BaseModel)):
    """``SomeConfig(...)`` in code raises :class:`ConfigError` too. (Not an ``__init__`` override:
    pydantic would then build nested sections through it, in lax Python mode.)"""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise config_error(exc, cls) from None


class ConfigModel(BaseModel, metaclass=_ConfigMeta):
    """A stage config or one of its sections: frozen, unknown keys refused, errors as :class:`ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------------------------------- errors

_WHY = {
    "int_type": "expected an integer", "int_parsing": "expected an integer", "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "path_type": "expected a path",
    "model_type": "expected a mapping", "model_attributes_type": "expected a mapping", "dict_type": "expected a mapping",
    "dataclass_type": "expected a mapping", "list_type": "expected a list", "tuple_type": "expected a list",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_BOUND_KEYS = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}


def _strip(tp: Any) -> Any:
    """``X | None`` -> X; ``Annotated[X, ...]`` -> X."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _type_at(tp: Any, loc: tuple) -> Any:
    """The annotation at ``loc`` inside config class ``tp`` (None where it cannot tell)."""
    for part in loc:
        tp = _strip(tp)
        origin, args = get_origin(tp), get_args(tp)
        if _is_model(tp) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            tp = args[0] if args else Any
        elif origin is tuple and isinstance(part, int) and part < len(args):
            tp = args[part]
        elif origin is dict and args:
            tp = args[1]
        else:
            return None
    return _strip(tp)


def _dotted(loc: Iterable[Any]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _why(err: dict[str, Any], tp: Any, parent: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden" and _is_model(parent):
        return f"unknown key for {parent.__name__}; valid keys: {sorted(parent.model_fields)}"
    if kind == "string_type" and tp is Path:
        return "expected a path"
    if kind in _WHY:
        return _WHY[kind]
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {ctx[_BOUND_KEYS[kind]]}"
    if kind == "literal_error":
        return f"must be one of {list(get_args(tp))}" if get_origin(tp) is Literal else f"must be {ctx['expected']}"
    if kind in ("too_short", "too_long"):
        if get_origin(tp) is tuple and Ellipsis not in get_args(tp):
            return f"expected {len(get_args(tp))} items"
        bound = "at least" if kind == "too_short" else "at most"
        return f"needs {bound} {ctx.get('min_length' if kind == 'too_short' else 'max_length')} item(s)"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return "must not be empty" if ctx.get("pattern") == r"\S" else f"must match {ctx.get('pattern')}"
    return err["msg"]


def config_error(exc: ValidationError, cls: type, prefix: str = "") -> ConfigError:
    """pydantic's errors as one :class:`ConfigError`: ``dotted.key=value: why`` per error, ``; ``-joined."""
    messages = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = prefix + _dotted(loc)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # a model validator's require(): its key is relative to that model
            messages.append(f"{key}.{cause}" if key else str(cause))
        elif err["type"] == "missing":
            messages.append(f"{key}: missing (a required key of {cls.__name__})")
        else:
            why = _why(err, _type_at(cls, loc), _strip(_type_at(cls, loc[:-1])) if loc else None)
            messages.append(f"{key or cls.__name__}={err['input']!r}: {why}")
    return ConfigError("; ".join(messages))


# ---------------------------------------------------------------------------------------- loading

def config_class(kind: str) -> type:
    """The config class registered for ``kind``."""
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"kind={kind!r}: unknown config kind; known: {sorted(CONFIG_KINDS)}")
    module_name, _, class_name = CONFIG_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


class _Loader(yaml.SafeLoader):
    """YAML 1.1's SafeLoader, but ``3e-3`` (an exponent without a dot) is a float, as in YAML 1.2."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


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
            value = _load_yaml(raw) if raw.strip() else ""
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
        data = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    return data


def _read_nested_files(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Replace a config-typed field given as the path of its own YAML by that file's content."""
    if not _is_model(cls):
        return data
    out = dict(data)
    for name, value in data.items():
        field = cls.model_fields.get(name)
        tp = _strip(field.annotation) if field is not None else None
        if _is_model(tp) and isinstance(value, (str, Path)) and str(value).endswith((".yaml", ".yml")):
            nested = read_yaml(value)
            nested_kind, expected = nested.pop("kind", None), getattr(tp, "kind", None)
            require(nested_kind in (None, expected), prefix + name, str(value),
                    f"is a {nested_kind!r} config, expected {expected!r}")
            out[name] = nested
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file plus dotted overrides (defaults fill the rest)."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    kind = data.pop("kind", None)
    expected = getattr(cls, "kind", None)
    if kind is not None and expected is not None and kind != expected:
        raise ConfigError(f"kind={kind!r}: file {str(path)!r} is a {kind!r} config, expected {expected!r}")
    # Nested files first, so that an override into a section given as a file lands on its content.
    data = _merge(_read_nested_files(cls, data), parse_overrides(overrides))
    return from_dict(cls, data)


def load_any(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """Load a YAML whose top-level ``kind`` names its class."""
    data = read_yaml(path)
    if "kind" not in data:
        raise ConfigError(f"config file {str(path)!r}: missing top-level 'kind' (one of {sorted(CONFIG_KINDS)})")
    return load_config(config_class(data["kind"]), path, overrides)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel) or dataclasses.is_dataclass(value):
        return _plain(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{value!r} ({type(value).__name__}) is not config data")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build config class ``cls`` from a (nested) mapping, strictly (as pydantic validates JSON)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}={data!r}: expected a mapping")
    data = _read_nested_files(cls, data, prefix)
    try:
        return _adapter(cls).validate_json(json.dumps(data, default=_json_default), strict=True)
    except ValidationError as exc:
        raise config_error(exc, cls, prefix) from None


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, SecretStr):  # a secret is never logged or passed on: the environment supplies it
        return None
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-safe data (Paths become strings, tuples lists)."""
    out = _plain(cfg)
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
    """A copy of ``cfg`` with ``changes``, validated again (``dataclasses.replace`` for config models)."""
    if not isinstance(cfg, BaseModel):
        return dataclasses.replace(cfg, **changes)
    cls = type(cfg)
    return cls(**{**{name: getattr(cfg, name) for name in cls.model_fields}, **changes})


def main(argv: list[str] | None = None) -> int:
    """``omnidiff config check FILE...``: validate config files (kind from their top-level ``kind``)
    and print each resolved config as YAML, as torchtune's ``tune validate`` does. Exit status 1
    when any file is invalid; its error names the key and the value. Nested config files named in a
    pipeline YAML are read from the current directory (run it from the repository root)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="omnidiff config", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate config files and print the resolved configs")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument("-q", "--quiet", action="store_true", help="only the verdicts, not the resolved configs")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            cfg = load_any(path)
        except ConfigError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"# {path}: valid")
        if not args.quiet:
            print(dump_yaml(cfg), end="---\n")
    if len(args.files) > 1:
        print(f"# {len(args.files) - failed} valid, {failed} invalid", file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


__all__ = [
    "CONFIG_KINDS",
    "ConfigError",
    "ConfigModel",
    "NonBlank",
    "config_class",
    "config_error",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_any",
    "load_config",
    "main",
    "parse_overrides",
    "read_yaml",
    "replace",
    "require",
    "to_dict",
    "typing",
]
