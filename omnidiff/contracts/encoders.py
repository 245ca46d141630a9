"""What identifies an encoder, and so names its cache: the fingerprint inputs of each cache kind.

A cache lives in ``cache/<kind>/<fingerprint>/`` (docs/architecture.md "Embedding cache"). The
fingerprint is the SHA-256 (first 16 hex chars) of a canonical JSON of its inputs:

* ``llm``:    ``LLMTextEncoder.fingerprint_inputs()`` (model id, weights digest, layer, max length,
  dtype, template, normaliser version; for several layers how they combine, for an earlier layer than
  the last its norm) + the storage format;
* ``clip``:   ``ClipTextEncoder.fingerprint_inputs(max_windows)`` (weights + tokenizer digest, window
  layout, normaliser version) + the storage format;
* ``pixels``: resolution, value range, and for latents the VAE weights digest and scaling factor.

Any change to any input gives a different directory, so a stale hit is impossible: there is no
"invalidate" step to forget.

Both stages name a cache from plain settings with :func:`llm_spec`, :func:`clip_spec` and
:func:`pixels_spec`: they read config files, manifests and weight *files* (to digest them), and never
build a model. The embed actors re-derive the inputs from their loaded encoders and refuse to write
when the two differ, so these copies of the rules cannot drift silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from omnidiff.config import ConfigModel, require
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


def describe_llm(
    path: str | Path, layer: int | list[int] | tuple[int, ...] = -1, max_length: int = 512, dtype: str = "float32"
) -> tuple[dict, int]:
    """``(LLMTextEncoder(path, layer, max_length, dtype).fingerprint_inputs(), hidden_size)`` without loading weights.

    The embed driver names the cache before any actor loads the model, and the train stage finds the
    cache the same way (:func:`llm_spec`). Each embed actor re-derives the dict from its loaded encoder
    and refuses to write if the two differ, so this copy of the rule cannot drift silently.
    """
    from transformers import AutoConfig

    from omnidiff.models.llm import LAYER_COMBINE, LAYER_NORM, resolve_layers
    from omnidiff.models.llm_folders import read_manifest, weights_digest

    path = Path(path).resolve()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"llm.path={str(path)!r}: no config.json (for Gemma run 'omnidiff llm convert')")
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(text_config.num_hidden_layers)
    try:
        layers = resolve_layers(layer, n_layers, path.name)
    except ValueError as exc:
        raise ValueError(f"llm.{exc}") from None
    manifest = read_manifest(path)
    inputs = {
        "model_id": manifest.get("model_id") or path.name,
        "weights_digest": manifest.get("weights_digest") or weights_digest(path),
        "layer": layers[0] if len(layers) == 1 else list(layers),
        "max_length": int(max_length),
        "dtype": dtype,
        "template": "raw",
        "normaliser_version": NORMALISER_VERSION,
    }
    if len(layers) > 1:
        inputs["layer_combine"] = LAYER_COMBINE
    if min(layers) < n_layers:
        inputs["layer_norm"] = LAYER_NORM
    return inputs, int(text_config.hidden_size) * len(layers)


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


# What a CLIP-target cache stores per caption. The tiny base masks CLIP's padding everywhere, so only
# its real tokens are targets; a published SD / SDXL UNet cross-attends to all 77 positions of the
# window, padding included, so every position of each used window is (docs/architecture.md).
STORED_REAL_TOKENS = "mask-true tokens + pooled"
STORED_WINDOWS = "all 77 positions of each used window + pooled"


def clip_inputs(encoder_inputs: dict[str, Any], stored: str = STORED_REAL_TOKENS) -> dict[str, Any]:
    """Fingerprint inputs of a CLIP-target cache from ``ClipTextEncoder.fingerprint_inputs(max_windows)``
    (weights + tokenizer digest, window layout, normaliser version) or ``BaseTextEncoder``'s (``stored``
    = :data:`STORED_WINDOWS`)."""
    if not encoder_inputs:
        raise ValueError("CLIP fingerprint inputs are empty")
    return {
        "kind": "clip",
        "encoder": dict(encoder_inputs),
        "stored": stored,
        "storage": STORAGE_FORMAT,
    }


def pixels_inputs(
    resolution: int,
    vae_digest: str | None = None,
    vae_scaling_factor: float | None = None,
    vae_upcast: bool = False,
) -> dict:
    """Fingerprint inputs of an image cache: pixels in [-1, 1] or VAE latents (mean of the posterior).

    A latent cache also stores each image's original size and crop (SDXL's time ids: issue 16) and
    encodes in float32 where the VAE's config says ``force_upcast`` (SDXL's VAE overflows in fp16),
    both part of its inputs.
    """
    out: dict[str, Any] = {
        "kind": "pixels",
        "resolution": int(resolution),
        "resize": "shorter-side-bicubic+center-crop",
        "value_range": [-1.0, 1.0],
        "storage": STORAGE_FORMAT,
    }
    if vae_digest is not None:
        out["vae"] = {"digest": vae_digest, "scaling_factor": vae_scaling_factor, "latent": "posterior-mean",
                      "upcast": bool(vae_upcast), "sizes": "original_size+crop_top_left"}
    return out


# ---------------------------------------------------------------------------------------- the LLM


class LLMSection(ConfigModel):
    """The frozen LLM whose per-token states are cached (the embed stage) and read (the train stage).

    path: a transformers causal-LM folder; ``null`` = the converted Gemma 3 270M (``ensure_gemma()``).
    layer: index into ``hidden_states`` (0 = embeddings, -1 = last layer after the final norm), or a
        list of indices in increasing order, e.g. ``[6, 12, 18]``: those layers' states concatenated along
        the features (issue 18; ``LLMTextEncoder``), so the adapter reads ``len(layer) x`` the hidden size.
        A layer before the last goes through the model's final norm (Gemma's raw middle layers overflow fp16).
        The set of layers names the cache, and an exported pipeline encodes prompts with the same layers.
    max_length: tokens kept per caption (longer captions are cut).
    dtype: compute dtype; fp32 on CPU (these cores have no native bf16, NOTES.md). Storage is fp16.
    """

    path: Path | None = None
    layer: int | tuple[int, ...] = -1
    max_length: int = Field(512, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _layer_set(self) -> LLMSection:
        # The rest (within the model's depth, increasing once resolved) needs the model: resolve_layers.
        if isinstance(self.layer, tuple):
            require(len(self.layer) > 0, "layer", list(self.layer), "an empty list of layers (give an index or some)")
            require(len(set(self.layer)) == len(self.layer), "layer", list(self.layer), "a layer is listed twice")
        return self


def llm_folder(path: str | Path | None) -> Path:
    """The LLM folder an ``llm.path`` setting means: the path itself, or (``None``) the converted Gemma."""
    if path is not None:
        return Path(path).resolve()
    from omnidiff.models.llm_folders import ensure_gemma

    return ensure_gemma()


# ---------------------------------------------------------------------------------------- CLIP


def describe_clip(
    text_encoder: str | Path, tokenizer: str | Path, max_windows: int = 1, model_id: str = "clip-text"
) -> tuple[dict, int]:
    """``(ClipTextEncoder.from_pretrained(...).fingerprint_inputs(max_windows), hidden_size)`` without building it.

    The weights digest is the one ``ClipTextEncoder.weights_digest`` computes in memory (parameter
    names in sorted order, each tensor's fp32 bytes, then the tokenizer's JSON); here the tensors come
    straight from the safetensors files. The dtype is what ``from_pretrained`` loads (``dtype="auto"``:
    the config's, else the weights').
    """
    import contextlib

    import torch
    from safetensors import safe_open

    from omnidiff.models.clip_text import WINDOW, load_clip_tokenizer

    text_encoder = Path(text_encoder)
    config_path = text_encoder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{text_encoder}: no config.json (a ClipTextEncoder.save_pretrained folder)")
    config = json.loads(config_path.read_text())
    files = sorted(text_encoder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{text_encoder}: no *.safetensors weights")
    digest = hashlib.sha256()
    dtype = config.get("dtype") or config.get("torch_dtype")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 (safe_open is not a dict)
        for name in sorted(where):
            tensor = where[name].get_tensor(name)
            if dtype is None and tensor.is_floating_point():
                dtype = str(tensor.dtype)
            digest.update(name.encode() + b"\0")
            digest.update(tensor.to(torch.float32).contiguous().numpy().tobytes())
    digest.update(load_clip_tokenizer(tokenizer).backend_tokenizer.to_str().encode())
    inputs = {
        "model_id": model_id,
        "weights_digest": digest.hexdigest(),
        "layer": -1,
        "max_length": WINDOW * max_windows,
        "dtype": str(dtype or "float32").removeprefix("torch."),
        "template": f"clip-windows-{WINDOW}x{max_windows}",
        "normaliser_version": NORMALISER_VERSION,
    }
    return inputs, int(config["hidden_size"])


def describe_base_text(base, max_windows: int = 1) -> tuple[dict, int, int]:
    """``(BaseTextEncoder.from_base_folder(base).fingerprint_inputs(max_windows), hidden_size, pooled_dim)``
    of a published SD / SDXL folder (``contracts.base_folder``) without loading its towers.

    The digest is the one ``BaseTextEncoder.weights_digest`` computes in memory: per tower, the
    tensors of the safetensors files ``from_pretrained`` reads (the ``fp16`` variant where the folder
    has it) in name order as fp32 bytes, then its tokenizer's digest (the tokenizer is read: it is
    small and holds no weights).
    """
    import contextlib

    import torch
    from safetensors import safe_open

    from omnidiff.contracts.base_folder import open_base_folder, weight_files
    from omnidiff.models.clip_text import WINDOW, load_base_tokenizer, tokenizer_digest

    base = open_base_folder(base) if not hasattr(base, "towers") else base
    if base.layout == "omnidiff":
        raise ValueError(f"{base.path}: the tiny base is described by describe_clip")
    digest = hashlib.sha256()
    for i, tower in enumerate(base.towers):
        files = weight_files(tower.encoder, base.variant)
        if not files:
            raise FileNotFoundError(f"{tower.encoder}: no *.safetensors weights")
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
            where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 (safe_open is not a dict)
            for name in sorted(where):
                digest.update(f"{i}/{name}".encode() + b"\0")
                digest.update(where[name].get_tensor(name).to(torch.float32).contiguous().numpy().tobytes())
        digest.update(tokenizer_digest(load_base_tokenizer(tower.tokenizer)).encode())
    inputs = {
        "model_id": f"{base.layout}-text-encoders",
        "weights_digest": digest.hexdigest(),
        "layer": "penultimate-concat" if base.hidden_layer == "penultimate" else "last",
        "max_length": WINDOW * max_windows,
        "dtype": "float32",  # BaseTextEncoder.from_base_folder's compute dtype, whatever the files hold
        "template": f"pipeline-windows-{WINDOW}x{max_windows}",
        "empty_prompt": "zeros" if base.force_zeros_for_empty_prompt else "encoded",
        "normaliser_version": NORMALISER_VERSION,
    }
    last = base.towers[-1]
    return inputs, base.text_width, int(last.projection_dim or last.width)


# ---------------------------------------------------------------------------------------- VAE


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent along each side of a diffusers ``AutoencoderKL`` (8 for SD's VAE)."""
    return 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)


@dataclass(frozen=True)
class VAEInfo:
    """What names a latent cache, read from a diffusers ``AutoencoderKL`` folder (no weights loaded)."""

    digest: str
    scaling_factor: float
    latent_channels: int
    downsampling: int  # pixels per latent along each side
    force_upcast: bool  # encode / decode in float32 whatever the model's dtype (SDXL's VAE)

    def __iter__(self):  # ``digest, scale, channels, down = vae_info(path)`` as before
        return iter((self.digest, self.scaling_factor, self.latent_channels, self.downsampling))


def vae_info(vae: Path) -> VAEInfo:
    """Files digest, scaling factor, latent channels, downsampling factor and ``force_upcast`` of a VAE folder."""
    vae = Path(vae)
    config_path = vae / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"pixels.vae={str(vae)!r}: no config.json (a diffusers AutoencoderKL folder)")
    config = json.loads(config_path.read_text())
    down = vae_scale_factor(config)
    digest = files_digest(vae, patterns=("*.json", "*.safetensors", "*.bin"))
    return VAEInfo(digest, float(config.get("scaling_factor", 0.18215)), int(config.get("latent_channels", 4)), down,
                   bool(config.get("force_upcast", False)))


# ---------------------------------------------------------------------------------------- cache specs


@dataclass(frozen=True)
class CacheSpec:
    """What names one cache folder (``cache_dir(spec.kind, spec.fingerprint, root)``) and the shape of its values."""

    kind: str
    inputs: dict[str, Any]
    # (D,) per token for llm / clip; clip (D, P) when the pooled width P differs (SDXL); (C, H, W) for pixels
    value_shape: tuple[int, ...]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)


def llm_spec(path: str | Path, layer: int | list[int] | tuple[int, ...] = -1, max_length: int = 512, dtype: str = "float32") -> CacheSpec:
    """The LLM cache of ``LLMTextEncoder(path, layer, max_length, dtype)`` (config + manifest only)."""
    encoder_inputs, hidden = describe_llm(path, layer, max_length, dtype)
    return CacheSpec("llm", llm_inputs(encoder_inputs), (hidden,))


def clip_spec(text_encoder: str | Path, tokenizer: str | Path, max_windows: int) -> CacheSpec:
    """The CLIP-target cache of a base model's text encoder in ``max_windows`` windows (no model built)."""
    encoder_inputs, hidden = describe_clip(text_encoder, tokenizer, max_windows)
    return CacheSpec("clip", clip_inputs(encoder_inputs), (hidden,))


def is_published_base(folder: str | Path) -> bool:
    """Whether ``folder`` is a published SD / SDXL pipeline folder (its model_index.json says so)."""
    from omnidiff.contracts.base_folder import LAYOUTS

    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return False
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError:
        return False
    return LAYOUTS.get(str(cls)) in ("sd", "sdxl")


def base_clip_spec(base_model: str | Path, max_windows: int) -> CacheSpec:
    """The CLIP-target cache of a base model folder: a published SD / SDXL folder (every tower, what its
    pipeline feeds the UNet, :func:`describe_base_text`) or the tiny base (``text_encoder/`` +
    ``tokenizer/``, :func:`clip_spec`)."""
    base_model = Path(base_model)
    if not is_published_base(base_model):
        return clip_spec(base_model / "text_encoder", base_model / "tokenizer", max_windows)
    encoder_inputs, hidden, pooled = describe_base_text(base_model, max_windows)
    shape = (hidden,) if pooled == hidden else (hidden, pooled)
    return CacheSpec("clip", clip_inputs(encoder_inputs, STORED_WINDOWS), shape)


def pixels_spec(resolution: int, vae: str | Path | None = None) -> CacheSpec:
    """The image cache at ``resolution``: pixels (3, R, R), or the latents of the VAE folder ``vae``."""
    resolution = int(resolution)
    if vae is None:
        return CacheSpec("pixels", pixels_inputs(resolution), (3, resolution, resolution))
    info = vae_info(Path(vae))
    if resolution % info.downsampling:
        raise ValueError(f"pixels.resolution={resolution}: must be a multiple of the VAE's downsampling {info.downsampling}")
    side = resolution // info.downsampling
    inputs = pixels_inputs(resolution, info.digest, info.scaling_factor, info.force_upcast)
    return CacheSpec("pixels", inputs, (info.latent_channels, side, side))
