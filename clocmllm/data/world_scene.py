"""Sampling one scene of the synthetic world: which objects, where, on what background.

Difficulty rules (ours, chosen so that region understanding is needed):
- Most images hold 2-4 objects (a few 1 or 5), see `world_vocab.OBJECT_COUNT_P`.
- The first object is the *target*; each further object is a distractor that shares the
  target's colour (other shape), or its shape (other colour), or both (other size), with
  probability 0.9 together; the rest are random. No two objects share all three attributes,
  so every region phrase 'size colour shape' is unique in its image.
- Boxes stay inside the image and overlap at most `MAX_OVERLAP` of the smaller box, so
  objects may touch or overlap a little but never hide each other.
- An object whose colour is too close to the background under it forces a new background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clocmllm.boxes import box_area
from clocmllm.data import world_vocab as V
from clocmllm.data.world_render import HALF_EXTENT, object_box


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    size: str
    rgb: tuple[float, float, float]
    cx: float
    cy: float
    r: float

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def box(self) -> list[float]:
        return object_box(self.shape, self.cx, self.cy, self.r)

    def attr(self, name: str) -> str:
        return getattr(self, name)


@dataclass(frozen=True)
class Background:
    tone: str
    kind: str
    rgb: tuple[float, float, float]
    rgb2: tuple[float, float, float]  # far end of a gradient

    @property
    def phrase(self) -> str:
        return V.background_phrase(self.tone, self.kind)


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple[WorldObject, ...]
    background: Background


def _attributes(rng: np.random.Generator, target: tuple[str, str, str] | None) -> tuple[str, str, str]:
    shapes, colors, sizes = V.SHAPES, tuple(V.COLORS), tuple(V.SIZES)
    shape, color, size = (
        shapes[rng.integers(len(shapes))],
        colors[rng.integers(len(colors))],
        sizes[rng.integers(len(sizes))],
    )
    if target is None:
        return shape, color, size
    t_shape, t_color, t_size = target
    u = rng.random()
    if u < 0.4:  # same colour, another shape
        shape = _other(rng, shapes, t_shape)
        color = t_color
    elif u < 0.8:  # same shape, another colour
        shape = t_shape
        color = _other(rng, colors, t_color)
    elif u < 0.9:  # same shape and colour, the other size
        shape, color, size = t_shape, t_color, _other(rng, sizes, t_size)
    return shape, color, size


def _other(rng: np.random.Generator, values: tuple[str, ...], avoid: str) -> str:
    rest = [v for v in values if v != avoid]
    return rest[rng.integers(len(rest))]


def _overlap(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / max(1e-9, min(box_area(a), box_area(b)))


def _background(rng: np.random.Generator, tone: str | None = None) -> Background:
    tone = tone or tuple(V.BACKGROUND_TONES)[rng.integers(len(V.BACKGROUND_TONES))]
    kind = V.BACKGROUND_KINDS[rng.integers(len(V.BACKGROUND_KINDS))]
    lo, hi = V.BACKGROUND_TONES[tone]
    lum = rng.uniform(lo, hi)
    rgb = tuple(float(lum + t) for t in rng.uniform(-V.BACKGROUND_TINT, V.BACKGROUND_TINT, 3))
    # A gradient runs towards another grey of the same tone, so its name stays true.
    lum2 = rng.uniform(lo, hi)
    rgb2 = tuple(float(lum2 + t) for t in rng.uniform(-V.BACKGROUND_TINT, V.BACKGROUND_TINT, 3))
    return Background(tone, kind, rgb, rgb2)


def _contrast_ok(obj: WorldObject, bg: Background) -> bool:
    """The object's colour is far enough from every colour the background takes."""
    ends = (bg.rgb, bg.rgb2) if bg.kind == "gradient" else (bg.rgb,)
    margin = 15.0 if bg.kind == "textured" else 0.0  # noise moves the background a little
    return all(math.dist(obj.rgb, end) >= V.MIN_CONTRAST + margin for end in ends)


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    n = int(rng.choice(V.OBJECT_COUNTS, p=V.OBJECT_COUNT_P))
    objects: list[WorldObject] = []
    target: tuple[str, str, str] | None = None
    for _ in range(n):
        attrs = None
        for _try in range(20):
            cand = _attributes(rng, target)
            if all((o.shape, o.color, o.size) != cand for o in objects):
                attrs = cand
                break
        if attrs is None:
            continue
        obj = _place(rng, size, attrs, objects)
        if obj is None:
            continue  # no room left: the image holds fewer objects
        objects.append(obj)
        if target is None:
            target = attrs
    bg = _background(rng)
    if not all(_contrast_ok(o, bg) for o in objects):
        other = "light" if bg.tone == "dark" else "dark"
        bg = _background(rng, other)
        for _try in range(20):
            if all(_contrast_ok(o, bg) for o in objects):
                break
            bg = _background(rng, other)
    return Scene(size, tuple(objects), bg)


def _place(
    rng: np.random.Generator, size: int, attrs: tuple[str, str, str], objects: list[WorldObject]
) -> WorldObject | None:
    shape, color, size_name = attrs
    lo, hi = V.SIZES[size_name]
    base = np.asarray(V.COLORS[color], np.float64)
    rgb = tuple(
        float(c) for c in np.clip(base + rng.integers(-V.COLOR_JITTER, V.COLOR_JITTER + 1, 3), 0, 255)
    )
    hx, hy = HALF_EXTENT[shape]
    for _try in range(50):
        r = rng.uniform(lo, hi) * size
        cx = rng.uniform(hx * r + 0.5, size - hx * r - 0.5)
        cy = rng.uniform(hy * r + 0.5, size - hy * r - 0.5)
        obj = WorldObject(
            shape, color, size_name, rgb, round(float(cx), 2), round(float(cy), 2), round(float(r), 2)
        )
        box = obj.box
        if all(_overlap(box, o.box) <= V.MAX_OVERLAP for o in objects):
            return obj
    return None
