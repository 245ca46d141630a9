"""Which model the server serves: a config's ``model`` pinned to one version, and its card.

A registry name resolves through ``alias`` then ``fallback_alias`` to one version in the driver,
so every replica loads the same one; the card (/v1/models) joins the version's registry tags
with the folder's lineage.json.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

from omnidiff.config import ConfigError
from serve.config import ServeConfig

_REGISTRY_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[0-9]+))?$")


def pin_model(cfg: ServeConfig) -> dict[str, Any]:
    """Resolve ``cfg.model`` to one fixed model, in the driver, so every replica loads the same one.

    Returns ``{"id", "source", "ref", "version", "alias", "created", "registry"}``: ``ref`` is what a
    replica loads (a folder, or ``name/version`` it resolves itself); ``registry`` holds the version's
    tags and run id (lineage). A bare name tries ``cfg.alias`` then ``cfg.fallback_alias``.
    """
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        folder = path.resolve()
        if not (folder / "model_index.json").is_file():
            raise ConfigError(f"model={cfg.model!r}: folder has no model_index.json (not a pipeline folder)")
        return {"id": folder.name, "source": str(folder), "ref": str(folder), "version": None, "alias": None,
                "created": int(folder.stat().st_mtime), "registry": {}}
    match = _REGISTRY_REF.match(cfg.model)
    if not match:
        raise ConfigError(f"model={cfg.model!r}: neither a pipeline folder nor a registry ref (name, name@alias, name/3)")
    name = match.group("name")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            f"model={cfg.model!r}: a registry ref needs MLFLOW_TRACKING_URI (run `omnidiff stack up`) "
            "or give a pipeline folder path"
        )
    client = MlflowClient()
    if match.group("version"):
        try:
            mv = client.get_model_version(name, match.group("version"))
        except MlflowException as exc:
            raise ConfigError(f"model={cfg.model!r}: no such registered model version ({exc.message})") from None
        alias = None
    else:
        aliases = [match.group("alias")] if match.group("alias") else [a for a in (cfg.alias, cfg.fallback_alias) if a]
        mv, alias, errors = None, None, []
        for candidate in aliases:
            try:
                mv, alias = client.get_model_version_by_alias(name, candidate), candidate
                break
            except MlflowException as exc:
                errors.append(f"@{candidate}: {exc.message}")
        if mv is None:
            raise ConfigError(f"model={cfg.model!r}: no version of {name!r} has alias {' or '.join(aliases)} ({'; '.join(errors)})")
    registry = {str(k): str(v) for k, v in (mv.tags or {}).items()}
    if mv.run_id:
        registry.setdefault("run_id", mv.run_id)
    registry["model_version"] = str(mv.version)
    return {"id": name, "source": f"models:/{name}@{alias}" if alias else f"models:/{name}/{mv.version}",
            "ref": f"{name}/{mv.version}", "version": str(mv.version), "alias": alias,
            "created": int((mv.creation_timestamp or 0) / 1000), "registry": registry}


def _flat_strings(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flat_strings(value, f"{prefix}{key}."))
    elif isinstance(data, list):
        out[prefix.rstrip(".")] = ",".join(str(v) for v in data)
    elif data is not None:
        out[prefix.rstrip(".")] = str(data)
    return out


def model_card(pinned: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The served model as /v1/models shows it: pinned registry facts + the folder's lineage.json."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    lineage_file = folder / "lineage.json"
    lineage = _flat_strings(json.loads(lineage_file.read_text(encoding="utf-8"))) if lineage_file.is_file() else {}
    lineage.update(pinned["registry"])  # the registry's tags are the authority when both say something
    return {"id": pinned["id"], "object": "model", "created": pinned["created"], "owned_by": "omnidiff",
            "version": pinned["version"], "alias": pinned["alias"], "source": pinned["source"],
            "conditioning": index.get("conditioning"), "lineage": lineage}
