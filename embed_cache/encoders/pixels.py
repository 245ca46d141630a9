"""``PixelShardEncoder``: each distinct image as float16 (C, H, W) in [-1, 1], or its VAE latents.

What stages 2-3 train on; with ``pixels.vae`` set (an SD-class model's diffusers AutoencoderKL
folder) the cache holds the posterior mean times the VAE's scaling factor instead of pixels.
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
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(vae).to(device).eval()

    def compute(self, images: list[bytes]) -> list[np.ndarray]:
        pixels = np.stack([decode_image(data, self.resolution) for data in images])  # (B, 3, H, W)
        if self.vae is None:
            return list(pixels)
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device)
            latents = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor  # (B, C', h, w)
        return list(latents.float().cpu().numpy())

    def table(self, keys, values):
        return pixels_table(keys, np.stack(values))


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Encoded image bytes -> float32 ``(3, R, R)`` in [-1, 1]; other sizes: shorter side to R, centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
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
    return arr.transpose(2, 0, 1) / 127.5 - 1.0
