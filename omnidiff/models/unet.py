"""The base model's denoiser: a diffusers ``UNet2DConditionModel`` built from plain arguments.

For the tiny world it works in pixel space (``in_channels = out_channels = 3``, 16x16); an SD-class
model is the same class at latent size with a VAE in front (omnidiff.pipeline). Sizing measured
here (../shared/NOTES.md): block_out_channels (32, 64, 64), cross-attention in the two lower blocks,
~1.7M parameters, 16x16, 0.5 s a step at batch 64 on 2 cores.

    unet = build_unet(16, 3, 3, (32, 64, 64), cross_attention_dim=128, layers_per_block=1, attention_head_dim=8)
    eps = unet(x, t, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample   # (B, 3, 16, 16)

Coordinate channels (CoordConv, Liu et al. 2018, https://arxiv.org/abs/1807.03247; issue 18 item 2):
``build_unet(..., coord_channels=True)`` makes ``in_channels = out_channels + 2``, and
``omnidiff.pipeline.predict_noise`` appends two fixed channels, y and x in [-1, 1], to every sample
(:func:`add_coord_channels`). A convolution and a cross-attention query are the same at every pixel,
so without them the UNet can only tell where it is from the zero padding: the tiny base then drew
"in the top left corner" in whichever corner the noise suggested (benchmarks/base_position.py).
The folder stays a plain diffusers ``UNet2DConditionModel``; the channel difference is the marker.
"""

from __future__ import annotations

import math

import torch

COORD_CHANNELS = 2  # y, x


def coord_channels(unet) -> int:
    """How many coordinate channels ``unet`` reads after the sample: 2 when ``in_channels = out_channels + 2``
    (built with ``coord_channels=True``), 0 when they are equal; any other difference is refused."""
    extra = int(unet.config.in_channels) - int(unet.config.out_channels)
    if extra not in (0, COORD_CHANNELS):
        raise ValueError(
            f"UNet with in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}: "
            f"expected equal counts, or {COORD_CHANNELS} more inputs (coordinate channels); other extra inputs "
            "(e.g. an inpainting UNet's mask and masked image) are not supported"
        )
    return extra


def add_coord_channels(sample: torch.Tensor) -> torch.Tensor:
    """``sample (B, C, H, W)`` -> ``(B, C + 2, H, W)``: the sample, then y and x (pixel centres spanning
    [-1, 1]: -1 = top / left). A function of the grid size only, so any resolution gets its own grid."""
    b, _, h, w = sample.shape
    ys = torch.linspace(-1.0, 1.0, h, device=sample.device, dtype=sample.dtype)  # (H,)
    xs = torch.linspace(-1.0, 1.0, w, device=sample.device, dtype=sample.dtype)  # (W,)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, H, W)
    return torch.cat([sample, grid.expand(b, -1, -1, -1)], dim=1)


def build_unet(
    sample_size: int,
    in_channels: int,
    out_channels: int,
    block_out_channels: tuple[int, ...] | list[int],
    cross_attention_dim: int,
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    pooled_dim: int | None = None,
    cross_attention_levels: int | None = None,
    coord_channels: bool = False,
):
    """A ``UNet2DConditionModel`` with cross-attention in the ``cross_attention_levels`` lowest-resolution
    levels (default: all but the first, full-resolution one, where attention is the costliest) and in
    the mid block.

    ``attention_head_dim`` is the width of one head: each level gets ``channels // attention_head_dim``
    heads (diffusers' own ``attention_head_dim`` argument is really a head count, hence the conversion).
    ``pooled_dim`` adds SDXL-like pooled-text conditioning: the pooled embedding ``(B, pooled_dim)`` is
    projected and added to the timestep embedding (``class_embed_type="projection"``); pass it as
    ``class_labels=pooled`` in forward.
    ``coord_channels`` adds two input channels for the pixel coordinates (``in_channels + 2`` inputs;
    ``omnidiff.pipeline.predict_noise`` fills them with :func:`add_coord_channels`).
    """
    from diffusers import UNet2DConditionModel

    channels = tuple(int(c) for c in block_out_channels)
    levels = len(channels)
    if levels < 1:
        raise ValueError("block_out_channels: at least one level")
    if sample_size % (2 ** (levels - 1)):
        raise ValueError(f"sample_size={sample_size} must be divisible by 2**{levels - 1} for {levels} levels")
    for c in channels:
        if c % attention_head_dim:
            raise ValueError(f"block_out_channels has {c}, not divisible by attention_head_dim={attention_head_dim}")
    n_cross = levels - 1 if cross_attention_levels is None else int(cross_attention_levels)
    if levels == 1:
        n_cross = 1 if cross_attention_levels is None else n_cross
    if not 0 <= n_cross <= levels:
        raise ValueError(f"cross_attention_levels={cross_attention_levels}: must be 0..{levels}")
    cross = [i >= levels - n_cross for i in range(levels)]  # level i (0 = full resolution) has cross-attention
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross))
    groups = math.gcd(32, *channels)  # GroupNorm needs groups dividing every width
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels + (COORD_CHANNELS if coord_channels else 0),
        out_channels=out_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(c // attention_head_dim for c in channels),  # diffusers: = heads per level
        norm_num_groups=groups,
        class_embed_type="projection" if pooled_dim else None,
        projection_class_embeddings_input_dim=pooled_dim if pooled_dim else None,
    )
