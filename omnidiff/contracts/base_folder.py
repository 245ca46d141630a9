"""What a base model folder is: the contract every stage reads a text-to-image base through (issue 16).

A base model is a local diffusers pipeline folder as published, in one of three layouts:

- ``sd``: ``StableDiffusionPipeline`` (SD 1.x / 2.x): ``text_encoder/`` (``CLIPTextModel``) +
  ``tokenizer/``, ``unet/``, ``vae/``, ``scheduler/``. Its pipeline conditions the UNet on the
  **last hidden state** (after the final layer norm) of all 77 positions of the CLIP window
  (diffusers ``StableDiffusionPipeline.encode_prompt``, ``clip_skip=None``).
- ``sdxl``: ``StableDiffusionXLPipeline``: two text towers (``text_encoder`` = ``CLIPTextModel``,
  ``text_encoder_2`` = ``CLIPTextModelWithProjection``), whose **penultimate** hidden states are
  concatenated along features (e.g. 768 + 1280 = 2048), the pooled ``text_embeds`` taken from
  ``text_encoder_2``'s projection, and ``time_ids`` (original size, crop, target size) added to
  the timestep embedding (``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``).
  ``force_zeros_for_empty_prompt`` in ``model_index.json`` makes the unconditional embedding zeros.
- ``omnidiff``: the project's own tiny pixel-space base (``omnidiff base pretrain``), one
  word-level CLIP tower with a ``tokenizer.json``.

Tokenizers are accepted as published (``vocab.json`` + ``merges.txt``) or as ``tokenizer.json``;
weights as safetensors only, with or without an ``fp16`` variant. ``open_base_folder(path)``
reads configs only (no weights) and raises ``BaseFolderError`` naming what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LAYOUTS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "OmniDiffusionPipeline": "omnidiff"}
Layout = Literal["sd", "sdxl", "omnidiff"]
CLIP_WINDOW = 77
VARIANTS = ("fp16", "bf16")


class BaseFolderError(ValueError):
    """The folder is not a base model this project can use; the message names what is missing."""


@dataclass(frozen=True)
class TextTower:
    """One CLIP text encoder of the base and its tokenizer (configs only)."""

    name: str  # "text_encoder" or "text_encoder_2"
    encoder: Path
    tokenizer: Path
    width: int  # hidden_size: the features this tower adds to the UNet's context
    projection_dim: int | None  # CLIPTextModelWithProjection's text_embeds width; None without projection
    config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)


@dataclass(frozen=True)
class BaseFolder:
    path: Path
    layout: Layout
    towers: tuple[TextTower, ...]
    hidden_layer: Literal["last", "penultimate"]  # which hidden state the pipeline feeds the UNet
    cross_attention_dim: int  # the UNet's context width = the adapter's token width
    pooled_dim: int | None  # SDXL's text_embeds width (the adapter's pooled head); None where unused
    time_ids: bool  # the UNet takes SDXL's added time ids (addition_embed_type == "text_time")
    force_zeros_for_empty_prompt: bool
    vae: Path | None  # None: pixel space (the omnidiff tiny base)
    vae_config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    unet_config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    scheduler_config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    variant: str | None = None  # "fp16" when some component's weights exist only as *.fp16.safetensors

    @property
    def latent_space(self) -> bool:
        return self.vae is not None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD's VAE); 1 in pixel space."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was trained at: its ``sample_size`` times the VAE's factor."""
        sample = self.unet_config.get("sample_size", 64)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def text_width(self) -> int:
        """Features per token of the conditioning the base's own pipeline builds (sum over towers)."""
        return sum(t.width for t in self.towers)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained`` of this folder's components (safetensors, variant)."""
        return {"use_safetensors": True, **({"variant": self.variant} if self.variant else {})}


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise BaseFolderError(f"{path.parent}: no {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaseFolderError(f"{path}: not valid JSON ({exc})") from exc


def _weights_variant(folder: Path) -> str | None:
    """``None`` when ``folder`` has plain safetensors weights, ``"fp16"`` when only the fp16 variant."""
    files = [p.name for p in folder.glob("*.safetensors")]
    if any(".fp16." not in name for name in files):
        return None
    if files:
        return "fp16"
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    if pickled:
        raise BaseFolderError(
            f"{folder}: weights only as {', '.join(pickled)}; this project loads safetensors only "
            "(convert them, e.g. diffusers' save_pretrained(safe_serialization=True))"
        )
    raise BaseFolderError(f"{folder}: no *.safetensors weights")


def tower_variant(folder: Path, variant: str | None) -> str | None:
    """The variant ``from_pretrained`` must ask ``folder`` for: the folder's ``variant`` where it has such
    files (diffusers falls back to plain weights per component the same way), else ``None``."""
    if variant and any(folder.glob(f"*.{variant}.safetensors")):
        return variant
    return None


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files ``from_pretrained(folder, variant=tower_variant(folder, variant))`` reads."""
    chosen = tower_variant(folder, variant)
    files = sorted(folder.glob("*.safetensors"))
    if chosen:
        return [p for p in files if f".{chosen}." in p.name]
    return [p for p in files if not any(f".{v}." in p.name for v in VARIANTS)]


def _tokenizer_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise BaseFolderError(f"{folder}: missing (a tokenizer folder)")
    if (folder / "tokenizer.json").is_file():
        return folder
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise BaseFolderError(f"{folder}: no tokenizer.json and no {' + '.join(missing)} (a CLIP BPE tokenizer)")
    return folder


def _tower(root: Path, name: str, tokenizer: str) -> TextTower:
    encoder = root / name
    config = _json(encoder / "config.json", f"the {name} config")
    if "hidden_size" not in config:
        raise BaseFolderError(f"{encoder}/config.json: no hidden_size (not a CLIP text model config)")
    projection = config.get("projection_dim") if "WithProjection" in str(config.get("architectures", "")) else None
    return TextTower(name, encoder, _tokenizer_folder(root / tokenizer), int(config["hidden_size"]),
                     int(projection) if projection else None, config)  # fmt: skip


def open_base_folder(path: str | Path) -> BaseFolder:
    """Read a base model folder's layout and widths from its configs (no weights are loaded)."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise BaseFolderError(f"base_model={str(path)!r}: not a folder")
    index = _json(root / "model_index.json", "a diffusers pipeline folder has one")
    cls = index.get("_class_name")
    layout = LAYOUTS.get(str(cls))
    if layout is None:
        raise BaseFolderError(
            f"{root}/model_index.json: _class_name={cls!r} is not a supported base "
            f"(supported: {', '.join(sorted(LAYOUTS))})"
        )
    needed = ["unet", "scheduler", "text_encoder", "tokenizer"]
    needed += ["vae"] if layout != "omnidiff" else []
    needed += ["text_encoder_2", "tokenizer_2"] if layout == "sdxl" else []
    missing = [name for name in needed if not (root / name).is_dir()]
    if missing:
        raise BaseFolderError(f"{root}: missing {', '.join(missing)}/ (a {cls} folder has them)")
    towers = [_tower(root, "text_encoder", "tokenizer")]
    if layout == "sdxl":
        towers.append(_tower(root, "text_encoder_2", "tokenizer_2"))
        if towers[1].projection_dim is None:
            raise BaseFolderError(f"{root}/text_encoder_2: not a CLIPTextModelWithProjection (SDXL pools from it)")
    unet = _json(root / "unet" / "config.json", "the UNet config")
    cross = unet.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    width = sum(t.width for t in towers)
    if layout != "omnidiff" and cross != width:
        raise BaseFolderError(
            f"{root}/unet: cross_attention_dim={cross} but the text encoders give {width} features "
            f"({' + '.join(str(t.width) for t in towers)})"
        )
    time_ids = unet.get("addition_embed_type") == "text_time"
    pooled = towers[-1].projection_dim if time_ids else None
    if layout == "sdxl" and not time_ids:
        raise BaseFolderError(f"{root}/unet: addition_embed_type={unet.get('addition_embed_type')!r}, SDXL's is 'text_time'")
    vae = root / "vae" if layout != "omnidiff" else None
    variants = {_weights_variant(root / name) for name in ("unet", *(t.name for t in towers), *(["vae"] if vae else []))}
    return BaseFolder(
        path=root,
        layout=layout,
        towers=tuple(towers),
        hidden_layer="penultimate" if layout == "sdxl" else "last",
        cross_attention_dim=int(cross),
        pooled_dim=pooled,
        time_ids=time_ids,
        # diffusers' StableDiffusionXLPipeline defaults it to True when model_index.json does not say
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", layout == "sdxl")),
        vae=vae,
        vae_config=_json(vae / "config.json", "the VAE config") if vae else {},
        unet_config=unet,
        scheduler_config=_json(root / "scheduler" / "scheduler_config.json", "the scheduler config"),
        variant="fp16" if "fp16" in variants else None,
    )
