"""The synthetic world's vocabulary: shapes, colours, sizes and backgrounds, as data.

Choices (ours; the paper has no synthetic world):
- Colours are saturated and backgrounds are near-neutral greys (dark or light, plain, gradient
  or lightly textured), so no background can hide an object; `world_scene` still checks the
  contrast of every object against the background under it.
- Sizes are absolute fractions of the image side with a gap between them (small radius at most
  0.10, large at least 0.15), so "small" and "large" never overlap even with jitter.
"""

from __future__ import annotations

GENERATOR_VERSION = "world-1"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")

# name -> base RGB; each object jitters each channel by up to COLOR_JITTER.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (145, 60, 195),
    "orange": (245, 135, 30),
    "pink": (240, 120, 195),
    "cyan": (40, 200, 215),
}
COLOR_JITTER = 12

# name -> (min, max) "radius" as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.075, 0.10),
    "large": (0.15, 0.20),
}

# Background tones: luminance range of the base grey; tint jitters channels a little.
BACKGROUND_TONES: dict[str, tuple[int, int]] = {"dark": (35, 85), "light": (165, 225)}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "textured")
BACKGROUND_TINT = 10
MIN_CONTRAST = 60.0  # minimum RGB distance between an object's colour and the background under it

# How many objects an image holds: mostly 2-4, a few 1 or 5.
OBJECT_COUNTS: tuple[int, ...] = (1, 2, 3, 4, 5)
OBJECT_COUNT_P: tuple[float, ...] = (0.05, 0.30, 0.35, 0.24, 0.06)

# Overlap bound: intersection over the smaller box, so a small object can never hide under a
# large one (an IoU bound alone would allow that).
MAX_OVERLAP = 0.2


def background_phrase(tone: str, kind: str) -> str:
    """How captions name a background: 'a dark gray background', 'a light textured background'."""
    if kind == "plain":
        return f"a {tone} gray background"
    return f"a {tone} {kind} background"


def class_names() -> list[str]:
    """Every region phrase the world can produce, 'size colour shape', in a fixed order."""
    return [f"{s} {c} {sh}" for s in SIZES for c in COLORS for sh in SHAPES]
