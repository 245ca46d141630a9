"""The tiny world's attributes: what an image can show and what a caption can ask for.

Chosen so that every value stays recognisable after img2dataset resizes the
served 32x32 images to the 16x16 the models train on (NOTES.md): five shapes with
different silhouettes, eight saturated colours, and backgrounds that are
achromatic, so no shape colour ever clashes with its background.
"""

from __future__ import annotations

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross", "diamond"),
    "colour": ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"),
    "position": ("top-left", "top-right", "bottom-left", "bottom-right", "centre"),
    "size": ("small", "large"),
    "background": ("black", "grey", "white"),
    # Image quality, never named in captions: what an aesthetic scorer has to find.
    "quality": ("clean", "degraded"),
}

# The attributes a prompt asks for (quality is a property of the image, not of the prompt).
PROMPT_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "position", "size", "background")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (250, 135, 0),
    "yellow": (245, 220, 20),
    "green": (30, 165, 55),
    "cyan": (0, 200, 215),
    "blue": (35, 65, 230),
    "purple": (135, 40, 195),
    "pink": (255, 115, 195),
}

# Achromatic and away from every shape colour's lightness extremes (white is a light grey
# so yellow still stands out from it).
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "grey": (120, 120, 120),
    "white": (235, 235, 235),
}

# Shape centres as fractions of the image side (x, y), y growing downwards.
POSITION_XY: dict[str, tuple[float, float]] = {
    "top-left": (0.3, 0.3),
    "top-right": (0.7, 0.3),
    "bottom-left": (0.3, 0.7),
    "bottom-right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}

# Shape "radius" as a fraction of the image side: at 16x16 about 3.2 px and 4.5 px, the smallest
# at which a diamond still reads as a diamond rather than a blob.
SIZE_RADIUS: dict[str, float] = {"small": 0.2, "large": 0.28}


def check_attrs(attrs: dict[str, str], names: tuple[str, ...] = PROMPT_ATTRIBUTES) -> None:
    """Raise ValueError naming the first missing or unknown attribute value."""
    for name in names:
        if name not in attrs:
            raise ValueError(f"attrs[{name!r}] is missing; expected one of {list(ATTRIBUTES[name])}")
        if attrs[name] not in ATTRIBUTES[name]:
            raise ValueError(f"attrs[{name!r}]={attrs[name]!r}: unknown value; expected one of {list(ATTRIBUTES[name])}")


assert set(COLOUR_RGB) == set(ATTRIBUTES["colour"])
assert set(BACKGROUND_RGB) == set(ATTRIBUTES["background"])
assert set(POSITION_XY) == set(ATTRIBUTES["position"])
assert set(SIZE_RADIUS) == set(ATTRIBUTES["size"])
