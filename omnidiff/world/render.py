"""Draw one tiny-world image from its attributes, at any resolution.

    from omnidiff.world import render
    render({"shape": "cross", "colour": "red", "position": "centre", "size": "large",
            "background": "black"}, 32).save("x.png")

Shapes are drawn ``supersample`` times larger and box-filtered down, so edges
are anti-aliased the same way at every resolution (served at 32x32, trained at
16x16 after img2dataset resizes). ``quality="degraded"`` blurs, washes out and
adds pixel noise after the downsampling, so the defect survives the resize and
an aesthetic scorer has something real to find; the attributes stay readable.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from omnidiff.world.attributes import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOUR_RGB,
    POSITION_XY,
    SIZE_RADIUS,
    check_attrs,
)

MAX_JITTER = 0.1  # fraction of the image side; more could push a corner shape out of its quadrant


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = 0.82 * r  # a slightly smaller half-side, so its area is close to the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.85 * r, cy), (cx, cy + r), (cx - 0.85 * r, cy)]
    if shape == "cross":
        w = 0.33 * r  # half the bar width: thick enough to survive 16x16, thin enough not to read as a blob
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    return None


def render(
    attrs: dict[str, str],
    resolution: int = 32,
    *,
    jitter: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
    supersample: int = 4,
) -> Image.Image:
    """An RGB ``resolution`` x ``resolution`` image of ``attrs``.

    attrs: shape, colour, position, size, background (see ATTRIBUTES) and
    optionally quality ("clean", the default, or "degraded").
    jitter: (dx, dy) shift of the shape centre, as a fraction of the side, at most MAX_JITTER.
    seed: seeds the noise of a degraded image (same inputs -> same pixels).
    """
    check_attrs(attrs)
    quality = attrs.get("quality", "clean")
    if quality not in ATTRIBUTES["quality"]:
        raise ValueError(f"attrs['quality']={quality!r}: unknown value; expected one of {list(ATTRIBUTES['quality'])}")
    if not isinstance(resolution, int) or resolution < 4:
        raise ValueError(f"resolution={resolution!r}: must be an integer >= 4")
    if not isinstance(supersample, int) or not 1 <= supersample <= 16:
        raise ValueError(f"supersample={supersample!r}: must be an integer in [1, 16]")
    if max(abs(jitter[0]), abs(jitter[1])) > MAX_JITTER:
        raise ValueError(f"jitter={jitter!r}: each component must be within +-{MAX_JITTER}")

    side = resolution * supersample
    canvas = Image.new("RGB", (side, side), BACKGROUND_RGB[attrs["background"]])
    draw = ImageDraw.Draw(canvas)
    fx, fy = POSITION_XY[attrs["position"]]
    cx, cy = (fx + jitter[0]) * side, (fy + jitter[1]) * side
    r = SIZE_RADIUS[attrs["size"]] * side
    fill = COLOUR_RGB[attrs["colour"]]
    polygon = _polygon(attrs["shape"], cx, cy, r)
    if polygon is None:  # circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)
    image = canvas.resize((resolution, resolution), Image.Resampling.BOX) if supersample > 1 else canvas
    if quality == "degraded":
        image = _degrade(image, seed)
    return image


def _degrade(image: Image.Image, seed: int) -> Image.Image:
    """Blur (about a pixel at 32x32), wash out towards grey, add Gaussian pixel noise."""
    side = image.size[0]
    blurred = image.filter(ImageFilter.GaussianBlur(radius=side * 0.03))
    pixels = np.asarray(blurred, dtype=np.float32)  # (H, W, 3)
    pixels = 0.8 * pixels + 0.2 * 128.0
    rng = np.random.default_rng(np.random.SeedSequence([seed, side]))
    pixels = pixels + rng.normal(0.0, 18.0, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
