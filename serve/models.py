"""Which model the server serves: a config's ``model`` pinned to one version, and its card.

A registry name resolves through ``alias`` then ``fallback_alias`` to one version in the driver,
so every replica loads the same one; the card (/v1/models) joins the version's registry tags
with the folder's lineage.json.

What the model can do is read from its folder when it is pinned (for a registry version, only
the few small JSON files are fetched): the sizes it supports and example prompts it knows.

    card.json          optional: {"sizes": ["WxH", ...], "example_prompts": [{"prompt", "lang"}, ...]}
                       (train/export.py writes the prompts from the training snapshot's val captions;
                       a real SD/SDXL base lists its several sizes here, and an export inherits them)
    unet/config.json   sample_size x the VAE's downsampling (vae/config.json) = the size it was trained
                       at: the only size of a folder whose card lists none
"""

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnidiff.config import ConfigError
from omnidiff.contracts.storage import is_remote
from serve.config import ServeConfig, parse_size

CARD_FILE = "card.json"
MAX_EXAMPLES = 12  # example prompts a card shows at most

_REGISTRY_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[0-9]+))?$")


def pin_model(cfg: ServeConfig) -> dict[str, Any]:
    """Resolve ``cfg.model`` to one fixed model, in the driver, so every replica loads the same one.

    Returns ``{"id", "source", "ref", "version", "alias", "created", "registry"}``: ``ref`` is what a
    replica loads (a folder, or ``name/version`` it resolves itself); ``registry`` holds the version's
    tags and run id (lineage). A bare name tries ``cfg.alias`` then ``cfg.fallback_alias``.
    """
    path = Path(cfg.model).expanduser()
    if is_remote(cfg.model):  # an export on object storage: its local copy, keyed by its manifest digest
        from omnidiff.tracking import resolve_model

        path = Path(resolve_model(cfg.model))
    if path.is_dir():
        folder = path.resolve()
        if not (folder / "model_index.json").is_file():
            raise ConfigError(f"model={cfg.model!r}: folder has no model_index.json (not a pipeline folder)")
        pinned = {"id": folder.name, "source": str(folder), "ref": str(folder), "version": None, "alias": None,
                  "created": int(folder.stat().st_mtime), "registry": {}}
        return {**pinned, **_served_facts(cfg, pinned, _folder_reader(folder))}
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
    pinned = {"id": name, "source": f"models:/{name}@{alias}" if alias else f"models:/{name}/{mv.version}",
              "ref": f"{name}/{mv.version}", "version": str(mv.version), "alias": alias,
              "created": int((mv.creation_timestamp or 0) / 1000), "registry": registry}
    return {**pinned, **_served_facts(cfg, pinned, _artifact_reader(mv.source))}


# ----------------------------------------------------------------------------- what the model can do

JsonReader = Callable[[str], Any]  # a path inside the model folder -> its parsed JSON, None when absent


def _folder_reader(folder: Path) -> JsonReader:
    def read(name: str) -> Any:
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    return read


def _artifact_reader(source: str) -> JsonReader:
    """Read single files of a registered version's folder (its ``source``) without downloading the weights."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    def read(name: str) -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/{name}", dst_path=tmp)
            except (MlflowException, OSError):
                return None
            path = Path(local)
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    return read


def model_facts(read: JsonReader, where: str) -> dict[str, Any]:
    """``{"native_size", "sizes", "example_prompts"}`` of a pipeline folder, from its JSON files.

    ``native_size``: what the UNet was trained at (``sample_size`` latents x the VAE's downsampling);
    ``sizes``: the card's list, else ``[native_size]``; ``example_prompts``: the card's, else none.
    A malformed card is a :class:`ConfigError` naming the file (``where``) and the key.
    """
    unet = read("unet/config.json")
    if not isinstance(unet, dict) or "sample_size" not in unet:
        raise ConfigError(f"{where}: unet/config.json has no sample_size (not a diffusers UNet folder)")
    sample = unet["sample_size"]
    height, width = (sample, sample) if isinstance(sample, int) else (int(sample[0]), int(sample[1]))
    vae = read("vae/config.json")
    down = 2 ** (len(vae["block_out_channels"]) - 1) if isinstance(vae, dict) and vae.get("block_out_channels") else 1
    native = f"{width * down}x{height * down}"
    card = read(CARD_FILE)
    card = {} if card is None else card
    if not isinstance(card, dict):
        raise ConfigError(f"{where}/{CARD_FILE}: expected a JSON object")
    sizes = card.get("sizes") or [native]
    if not isinstance(sizes, list) or len(set(map(str, sizes))) != len(sizes):
        raise ConfigError(f"{where}/{CARD_FILE}: sizes={sizes!r}: expected a list of distinct 'WIDTHxHEIGHT'")
    for size in sizes:
        try:
            parse_size(str(size))
        except ValueError as exc:
            raise ConfigError(f"{where}/{CARD_FILE}: sizes: {exc}") from None
    examples = []
    for item in card.get("example_prompts") or []:
        entry = {"prompt": item, "lang": None} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ConfigError(f"{where}/{CARD_FILE}: example_prompts: {item!r} is not a prompt "
                              "(a string or {\"prompt\": ..., \"lang\": ...})")
        examples.append({"prompt": entry["prompt"], "lang": entry.get("lang")})
    return {"native_size": native, "sizes": [str(s) for s in sizes], "example_prompts": examples[:MAX_EXAMPLES]}


def served_sizes(wanted: tuple[str, ...] | None, supported: list[str], model: str) -> list[str]:
    """The sizes requests may ask for: ``limits.sizes`` (``wanted``) when set, each one the model supports."""
    if wanted is None:
        return list(supported)
    for i, size in enumerate(wanted):
        if size not in supported:
            raise ConfigError(f"limits.sizes[{i}]={size!r}: {model} does not support it; its card lists "
                              f"{supported} (leave limits.sizes unset to serve them all)")
    return list(wanted)


def _served_facts(cfg: ServeConfig, pinned: dict[str, Any], read: JsonReader) -> dict[str, Any]:
    facts = model_facts(read, pinned["source"])
    return {"native_size": facts["native_size"], "supported_sizes": facts["sizes"],
            "sizes": served_sizes(cfg.limits.sizes, facts["sizes"], pinned["source"]),
            "example_prompts": facts["example_prompts"]}


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
    """The served model as /v1/models shows it to the token holder: pinned registry facts, what it can
    do, and the folder's lineage.json (:data:`PUBLIC_CARD_KEYS` is what everybody else sees)."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    lineage_file = folder / "lineage.json"
    lineage = _flat_strings(json.loads(lineage_file.read_text(encoding="utf-8"))) if lineage_file.is_file() else {}
    lineage.update(pinned["registry"])  # the registry's tags are the authority when both say something
    if index.get("conditioning") is None and index.get("_class_name") in BASE_PIPELINES:
        # A published SD / SDXL folder served as the baseline: its own CLIP tokenizer, English only.
        return {**_card(pinned, "base", lineage), "languages": ["en"],
                "note": f"the base model ({index['_class_name']}) as published: English prompts only"}
    return _card(pinned, index.get("conditioning"), lineage)


BASE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _card(pinned: dict[str, Any], conditioning: str | None, lineage: dict[str, str]) -> dict[str, Any]:
    return {"id": pinned["id"], "object": "model", "created": pinned["created"], "owned_by": "omnidiff",
            "version": pinned["version"], "alias": pinned["alias"], "source": pinned["source"],
            "conditioning": conditioning, "sizes": list(pinned["sizes"]),
            "native_size": pinned["native_size"], "example_prompts": list(pinned["example_prompts"]),
            "lineage": lineage}


# Without the token /v1/models shows only these: names, what the model can do, nothing about the server
# (``source`` can be an absolute path; ``lineage`` holds run ids, flow-run ids and paths; issue 15 item 7).
PUBLIC_CARD_KEYS = ("id", "object", "created", "owned_by", "version", "alias", "conditioning", "sizes", "native_size",
                    "example_prompts", "languages", "note")


def public_card(card: dict[str, Any]) -> dict[str, Any]:
    return {key: card[key] for key in PUBLIC_CARD_KEYS if key in card}
