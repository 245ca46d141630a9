"""Cache fingerprints: the name of a cache directory is a hash of everything that shapes its content.

A cache lives in ``cache/<kind>/<fingerprint>/`` (docs/architecture.md "Embedding cache"). The
fingerprint is the SHA-256 (first 16 hex chars) of a canonical JSON of its inputs:

* ``llm``:    ``LLMTextEncoder.fingerprint_inputs()`` (model id, weights digest, layer, max length,
  dtype, template, normaliser version) + the storage format;
* ``clip``:   ``ClipTextEncoder.fingerprint_inputs(max_windows)`` (weights + tokenizer digest, window
  layout, normaliser version) + the storage format;
* ``pixels``: resolution, value range, and for latents the VAE weights digest and scaling factor.

Any change to any input gives a different directory, so a stale hit is impossible: there is no
"invalidate" step to forget. The train stage finds its cache with :func:`llm_fingerprint` on the
same encoder inputs, or reads the fingerprint the embed run logged to MLflow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omnidiff.text import NORMALISER_VERSION

# Bump when the shard layout (columns, types, encodings) changes: old caches then stay untouched
# under their old fingerprint instead of being misread.
STORAGE_FORMAT = "parquet-unpadded-f16-v1"
FINGERPRINT_CHARS = 16
KINDS = ("llm", "clip", "pixels")


def _canonical(obj: Any) -> Any:
    """JSON-safe, order-independent form (Paths and tuples normalised) so equal inputs hash equally."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"fingerprint input {obj!r} ({type(obj).__name__}) is not JSON-safe")


def fingerprint(inputs: dict[str, Any]) -> str:
    """16 hex chars of SHA-256 over the canonical JSON of ``inputs``."""
    if "kind" not in inputs or inputs["kind"] not in KINDS:
        raise ValueError(f"fingerprint inputs need kind in {KINDS}, got {inputs.get('kind')!r}")
    blob = json.dumps(_canonical(inputs), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def llm_inputs(encoder_inputs: dict[str, Any]) -> dict[str, Any]:
    """Fingerprint inputs of an LLM cache from ``LLMTextEncoder.fingerprint_inputs()``."""
    if not encoder_inputs:
        raise ValueError("LLM fingerprint inputs are empty")
    return {"kind": "llm", "encoder": dict(encoder_inputs), "storage": STORAGE_FORMAT}


def llm_fingerprint(encoder_inputs: dict[str, Any]) -> str:
    """Directory name of the LLM cache for an encoder (``encoder.fingerprint_inputs()``)."""
    return fingerprint(llm_inputs(encoder_inputs))


def describe_llm(path: str | Path, layer: int = -1, max_length: int = 512, dtype: str = "float32") -> tuple[dict, int]:
    """``(LLMTextEncoder(path, layer, max_length, dtype).fingerprint_inputs(), hidden_size)`` without loading weights.

    The embed driver names the cache before any actor loads the model, and the train stage finds the
    cache the same way. Each embed actor re-derives the dict from its loaded encoder and refuses to
    write if the two differ, so this copy of the rule cannot drift silently.
    """
    from transformers import AutoConfig

    from omnidiff.models.llm import read_manifest, weights_digest

    path = Path(path).resolve()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"llm.path={str(path)!r}: no config.json (for Gemma run 'omnidiff llm convert')")
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(text_config.num_hidden_layers)
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"llm.layer={layer!r}: {path.name} has hidden_states 0..{n_layers} (or -1..-{n_layers + 1})")
    manifest = read_manifest(path)
    inputs = {
        "model_id": manifest.get("model_id") or path.name,
        "weights_digest": manifest.get("weights_digest") or weights_digest(path),
        "layer": layer % (n_layers + 1),
        "max_length": int(max_length),
        "dtype": dtype,
        "template": "raw",
        "normaliser_version": NORMALISER_VERSION,
    }
    return inputs, int(text_config.hidden_size)


def files_digest(*folders: Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """SHA-256 over the files of ``folders`` (relative name + bytes, sorted), e.g. weights + tokenizer."""
    digest = hashlib.sha256()
    count = 0
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a directory")
        files = sorted({p for pat in patterns for p in folder.rglob(pat) if p.is_file()})
        for path in files:
            digest.update(f"{folder.name}/{path.relative_to(folder).as_posix()}".encode() + b"\0")
            with path.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    digest.update(block)
            count += 1
    if count == 0:
        raise FileNotFoundError(f"{[str(f) for f in folders]}: no files to digest")
    return digest.hexdigest()


def clip_inputs(encoder_inputs: dict[str, Any]) -> dict[str, Any]:
    """Fingerprint inputs of a CLIP-target cache from ``ClipTextEncoder.fingerprint_inputs(max_windows)``
    (weights + tokenizer digest, window layout, normaliser version)."""
    if not encoder_inputs:
        raise ValueError("CLIP fingerprint inputs are empty")
    return {
        "kind": "clip",
        "encoder": dict(encoder_inputs),
        "stored": "mask-true tokens + pooled",
        "storage": STORAGE_FORMAT,
    }


def pixels_inputs(resolution: int, vae_digest: str | None = None, vae_scaling_factor: float | None = None) -> dict:
    """Fingerprint inputs of an image cache: pixels in [-1, 1] or VAE latents (mean of the posterior)."""
    out: dict[str, Any] = {
        "kind": "pixels",
        "resolution": int(resolution),
        "resize": "shorter-side-bicubic+center-crop",
        "value_range": [-1.0, 1.0],
        "storage": STORAGE_FORMAT,
    }
    if vae_digest is not None:
        out["vae"] = {"digest": vae_digest, "scaling_factor": vae_scaling_factor, "latent": "posterior-mean"}
    return out
