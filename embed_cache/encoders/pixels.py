"""``PixelShardEncoder``: each distinct image as float16 (C, H, W) in [-1, 1], or its VAE latents.

What stages 2-3 train on; with ``pixels.vae`` set (an SD-class model's diffusers AutoencoderKL
folder, e.g. ``<base>/vae``) the cache holds the posterior mean times the VAE's scaling factor
instead of pixels, plus each image's original size and crop (SDXL's time ids: issue 16). Where the
VAE's config says ``force_upcast`` (SDXL's VAE overflows in fp16), it encodes in float32 whatever
dtype it was loaded in, as diffusers' SDXL pipeline and training script do.
"""

from __future__ import annotations

import io

import numpy as np

from omnidiff.contracts.cache import pixels_table


class PixelShardEncoder:
    """Decoded images as float16 (C, H, W) in [-1, 1], or VAE latents (posterior mean x scaling factor)."""

    def __init__(self, resolution: int, vae: str | None, device: str, max_batch_size: int, batch_size: int = 64):
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)  # images per forward; the token budget means nothing here
        self.device = device
        self.vae = None
        if vae:
            from pathlib import Path

            import torch
            from diffusers import AutoencoderKL

            # fp16-only mirrors ship diffusion_pytorch_model.fp16.safetensors alone
            plain = [p for p in Path(vae).glob("*.safetensors") if ".fp16." not in p.name]
            variant = {} if plain or not list(Path(vae).glob("*.fp16.safetensors")) else {"variant": "fp16"}
            self.vae = AutoencoderKL.from_pretrained(vae, use_safetensors=True, **variant).to(device).eval()
            if getattr(self.vae.config, "force_upcast", False):
                self.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (diffusers upcasts too)

    def compute(self, images: list[bytes]) -> list:
        """One value per image: float32 ``(3, R, R)`` pixels, or ``(latents (C, h, w), sizes int32 (4,))`` with
        sizes = original (height, width) + crop (top, left)."""
        decoded = [decode_image(data, self.resolution, with_sizes=True) for data in images]
        pixels = np.stack([d[0] for d in decoded])  # (B, 3, R, R)
        if self.vae is None:
            return list(pixels)
        import torch

        dtype = next(self.vae.parameters()).dtype  # float32 where the config says force_upcast (see __init__)
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, dtype)
            latents = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor  # (B, C', h, w)
        sizes = [np.asarray([*d[1], *d[2]], dtype=np.int32) for d in decoded]
        return list(zip(latents.float().cpu().numpy(), sizes, strict=True))

    def table(self, keys, values):
        if self.vae is None:
            return pixels_table(keys, np.stack(values))
        sizes = np.stack([v[1] for v in values])  # (N, 4)
        return pixels_table(keys, np.stack([v[0] for v in values]), sizes[:, :2], sizes[:, 2:])


def decode_image(data: bytes, resolution: int, with_sizes: bool = False):
    """Encoded image bytes -> float32 ``(3, R, R)`` in [-1, 1]; other sizes: shorter side to R, centre crop.

    ``with_sizes``: ``(pixels, (height, width) as collected, (top, left) of the crop in the resized image)``:
    SDXL's ``original_size`` and ``crop_coords_top_left`` (diffusers' train_text_to_image_sdxl.py).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        original = (img.size[1], img.size[0])  # (height, width)
        top = left = 0
        if img.size != (resolution, resolution):
            w, h = img.size
            scale = resolution / min(w, h)
            img = img.resize(
                (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC
            )
            w, h = img.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(img, dtype=np.float32)  # (R, R, 3)
    pixels = arr.transpose(2, 0, 1) / 127.5 - 1.0
    return (pixels, original, (top, left)) if with_sizes else pixels
