"""What a checkpoint folder is the training of, so a resume can never continue someone else's run.

``run_identity.json`` beside the checkpoints holds the config (minus the settings a resume may
change) and the digests of every input; a later run on the same folder must match it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omnidiff.config import to_dict
from train.checkpoint import latest_tag
from train.config import TrainConfig
from train.inputs import StageInputs, TrainingError

# Settings that may change between a run and its resume (how it runs, not what it trains).
RESUMABLE_CHANGES = ("name", "max_steps", "dist", "checkpoint", "samples", "registry", "log_every", "track",
                     "micro_batch_size", "storage")  # storage: where things live, not what is trained
IDENTITY_NAME = "run_identity.json"


def identity(cfg: TrainConfig, inputs: StageInputs) -> dict:
    """What a checkpoint folder is the training of: the config minus run settings, plus its inputs."""
    resolved = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    resolved["data"] = {k: v for k, v in resolved["data"].items() if k not in ("cache_root", "snapshot_root")}
    return {
        "config": resolved,
        "snapshot_digest": inputs.snapshot.digest,
        "caches": {k: s.fingerprint for k, s in inputs.stores.items()},
        "base_model": _folder_digest(inputs.base_model / "unet"),
        "init_from": _folder_digest(inputs.init_from / "adapter") if inputs.init_from else None,
    }


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def check_checkpoint_folder(cfg: TrainConfig, ckpt_dir: Path, ident: dict, remote=None) -> str | None:
    """The tag a run will resume from (None = fresh); refuses a folder of another training.

    ``remote``: the checkpoint prefix on object storage (its ``run_identity.json`` and ``latest`` count).
    """
    tag = latest_tag(ckpt_dir, remote)
    path = ckpt_dir / IDENTITY_NAME
    if remote is not None:
        ckpt_dir = remote.url
    if tag is None:
        if remote is not None:
            remote.write_bytes(IDENTITY_NAME, json.dumps(ident, indent=1, sort_keys=True).encode())
            return None
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ident, indent=1, sort_keys=True))
        return None
    if cfg.checkpoint.resume == "never":
        raise TrainingError(f"{ckpt_dir} already holds checkpoints (latest {tag}) and checkpoint.resume is 'never': "
                            "choose another name or checkpoint.dir, or delete the folder")
    saved = None
    if remote is not None and remote.exists(IDENTITY_NAME):
        saved = json.loads(remote.read_bytes(IDENTITY_NAME))
    elif remote is None and path.is_file():
        saved = json.loads(path.read_text())
    if saved is not None:
        if saved != json.loads(json.dumps(ident, sort_keys=True)):
            diffs = _diff_keys(saved, json.loads(json.dumps(ident)))
            raise TrainingError(
                f"{ckpt_dir} holds checkpoints of a different training (differs in: {', '.join(diffs[:6])}); "
                f"only {', '.join(RESUMABLE_CHANGES)} may change on resume. Use another name or checkpoint.dir."
            )
    return tag


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
