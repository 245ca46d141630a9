"""Pluggable aesthetic scorers: images in, one float per image out (higher = nicer).

Stage 3 of the method (PAPER.md) fine-tunes on high-aesthetic images, so every
kept pair gets an ``aesthetic`` score. The scorer is chosen by name in the
config (``aesthetic_scorer``) and built once per run by :func:`build_scorer`:

* a registry name (:data:`SCORERS`), or
* ``"package.module:factory"``: any callable that returns a scorer, called with
  ``aesthetic_options`` from the config as keyword arguments.

A scorer is a callable ``scorer(images) -> np.ndarray`` taking a list of
``uint8 (H, W, 3)`` RGB arrays and returning ``float32 (N,)``. It is a class that
loads its weights once in ``__init__`` (STYLE.md 6).

The tiny world's scorer, :class:`ImageQualityScorer` (``image_quality``), needs
no weights: it measures pixel noise and edge sharpness, which is exactly what the
world's degraded images lose (render.py blurs, washes out and adds noise). On a
3000-image world at 16x16 every clean image scores above every degraded one
(clean >= 3.2, degraded <= 1.7 on a 0-10 scale).

Plugging in the LAION aesthetic predictor for a real run
------------------------------------------------------
The LAION predictor (github.com/christophschuhmann/improved-aesthetic-predictor)
is a linear/MLP head on L2-normalised CLIP ViT-L/14 image embeddings. Write a
factory in your own module, e.g. ``my_scorers/laion.py``::

    class LaionAestheticScorer:
        def __init__(self, clip_dir: str, head_path: str, device: str = "cuda"):
            from transformers import CLIPModel, CLIPImageProcessor
            self.clip = CLIPModel.from_pretrained(clip_dir).to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(clip_dir)
            self.head = torch.nn.Linear(768, 1); self.head.load_state_dict(torch.load(head_path))
            self.device = device

        @torch.no_grad()
        def __call__(self, images):                      # list of uint8 (H, W, 3)
            pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
            emb = self.clip.get_image_features(pixel_values=pixels)          # (N, 768)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return self.head(emb.float()).squeeze(-1).cpu().numpy()          # (N,) ~1-10

and point the config at it (weights are local files; nothing is downloaded)::

    aesthetic_scorer: my_scorers.laion:LaionAestheticScorer
    aesthetic_options: {clip_dir: /models/clip-vit-large-patch14, head_path: /models/sac+logos+ava1-l14-linearMSE.pth}

Note that the stored images are img2dataset's resized ones (``download.image_size``):
use a size the predictor was trained for (224+) in a real run.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


class AestheticScorer(Protocol):
    def __call__(self, images: list[np.ndarray]) -> np.ndarray: ...


# Immerkær's noise-estimation kernel: the difference of two Laplacians; zero on flat areas,
# ramps and planes, so what it responds to is noise (and edges, which the median ignores).
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def _gray(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (H, W) luma in grey levels 0-255 (ITU-R 601 weights)."""
    rgb = image[..., :3].astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _filter3x3(g: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Valid-mode 3x3 correlation: (H, W) -> (H-2, W-2)."""
    h, w = g.shape
    out = np.zeros((h - 2, w - 2), np.float32)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * g[dy : dy + h - 2, dx : dx + w - 2]
    return out


_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)


def image_quality(image: np.ndarray, noise_scale: float = 12.0) -> float:
    """Deterministic quality score in [0, 10] of one uint8 (H, W, 3) image.

    noise: median |noise-kernel response| over the interior (grey levels); clean flat
        colour gives 0, Gaussian noise gives ~sigma*2.
    sharpness: strongest Sobel gradient / the image's contrast (99th - 1st percentile);
        ~4 for a crisp edge whatever its contrast, lower when blurred.
    score = 10 * exp(-noise / noise_scale) * (0.5 + 0.5 * clip((sharpness - 2.5) / 2, 0, 1)).
    """
    g = _gray(image)
    if min(g.shape) < 3:
        return 0.0
    noise = float(np.median(np.abs(_filter3x3(g, _NOISE_KERNEL))))
    gx = _filter3x3(g, _SOBEL_X)
    gy = _filter3x3(g, _SOBEL_X.T)
    contrast = float(np.percentile(g, 99) - np.percentile(g, 1))
    sharpness = float(np.sqrt(gx * gx + gy * gy).max()) / max(contrast, 1.0)
    q_noise = np.exp(-noise / noise_scale)
    q_sharp = np.clip((sharpness - 2.5) / 2.0, 0.0, 1.0)
    return float(10.0 * q_noise * (0.5 + 0.5 * q_sharp))


class ImageQualityScorer:
    """The tiny world's scorer: :func:`image_quality` per image (no weights, deterministic)."""

    def __init__(self, noise_scale: float = 12.0):
        self.noise_scale = noise_scale

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        return np.array([image_quality(im, self.noise_scale) for im in images], np.float32)  # (N,)


SCORERS: dict[str, Callable[..., AestheticScorer]] = {
    "image_quality": ImageQualityScorer,
}


def build_scorer(name: str, options: dict[str, Any] | None = None) -> AestheticScorer:
    """A scorer from a registry name or ``module:factory``; an unknown name is a clear error."""
    options = dict(options or {})
    if name in SCORERS:
        factory = SCORERS[name]
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"aesthetic_scorer={name!r}: cannot import it ({exc})") from None
    else:
        raise ValueError(f"aesthetic_scorer={name!r}: unknown; use one of {sorted(SCORERS)} or 'module:factory'")
    return factory(**options)


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
