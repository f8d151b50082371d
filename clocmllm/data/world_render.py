"""Drawing the synthetic world with numpy: signed distance functions, antialiased by coverage.

Each shape is a signed distance field (negative inside, in pixels) evaluated only on the
object's own window; coverage = clip(0.5 - distance, 0, 1) gives one-pixel antialiasing for
free, which is much faster than supersampling and keeps rendering deterministic. Shapes are
centred on their bounding box, so a box is `centre ± half_extent(shape) * r` exactly.
"""

from __future__ import annotations

import math

import numpy as np

_SQRT2 = math.sqrt(2.0)
_TRI_R = 1.25  # triangle circumradius / r
_STAR_R = 1.15  # star outer radius / r
_STAR_INNER = 0.45  # star inner radius / outer radius
_STAR_SHIFT = (1.0 - math.cos(math.pi / 5)) / 2  # centres the star's box (top point is higher)

# Half extents of each shape's box, in units of r (x, y).
HALF_EXTENT: dict[str, tuple[float, float]] = {
    "circle": (1.0, 1.0),
    "square": (0.85, 0.85),
    "diamond": (1.1, 1.1),
    "triangle": (_TRI_R * math.sqrt(3) / 2, _TRI_R * 0.75),
    "cross": (0.95, 0.95),
    "ring": (1.0, 1.0),
    "star": (_STAR_R * math.cos(math.pi / 10), _STAR_R * (1 + math.cos(math.pi / 5)) / 2),
}


def shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, approximately Euclidean near the edge) to a shape centred at 0."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.1 * r) / _SQRT2
    if shape == "triangle":
        big = _TRI_R * r
        qy = dy - big / 4  # circumcentre sits below the box centre
        edges = np.maximum(qy, np.maximum(0.8660254 * dx - 0.5 * qy, -0.8660254 * dx - 0.5 * qy))
        return edges - big / 2
    if shape == "cross":
        a, b = 0.95 * r, 0.33 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return np.minimum(np.maximum(ax - a, ay - b), np.maximum(ax - b, ay - a))
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.72 * r) - 0.28 * r
    if shape == "star":
        return _star_sdf(dx, dy + _STAR_SHIFT * _STAR_R * r, _STAR_R * r)
    raise ValueError(f"unknown shape {shape!r}")


def _star_sdf(dx: np.ndarray, dy: np.ndarray, outer: float) -> np.ndarray:
    """Five-pointed star, one point up: radial distance to the star outline at each angle."""
    inner = _STAR_INNER * outer
    theta = np.arctan2(dx, -dy)  # 0 = straight up, so a point sits there
    sector = 2 * math.pi / 5
    phi = np.mod(theta, sector)
    phi = np.where(phi > sector / 2, sector - phi, phi)  # fold by symmetry into [0, pi/5]
    # Edge from the outer point A=(outer, 0) to the inner notch B=inner*(cos36, sin36), polar.
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    cross_ab = outer * by
    denom = (bx - outer) * np.sin(phi) - by * np.cos(phi)
    rho = cross_ab / np.abs(denom)
    # Scale the radial gap by the edge's slant so the antialiasing band stays about a pixel.
    return (np.hypot(dx, dy) - rho) * 0.55


def render_background(
    size: int, tone_rgb: np.ndarray, kind: str, rng: np.random.Generator, tone2_rgb: np.ndarray
) -> np.ndarray:
    """float32 (size, size, 3) background: plain, linear gradient, or light blotchy noise."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = tone_rgb
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        t = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img += t[..., None] * (tone2_rgb - tone_rgb)
    elif kind == "textured":
        cell = max(1, size // 16)
        n = -(-size // cell)
        noise = rng.normal(0.0, 5.0, (n, n, 1)).astype(np.float32)
        noise = np.repeat(np.repeat(noise, cell, 0), cell, 1)[:size, :size]
        img += noise + rng.normal(0.0, 3.0, (size, size, 1)).astype(np.float32)
    return img


def draw_object(img: np.ndarray, shape: str, cx: float, cy: float, r: float, rgb: np.ndarray) -> None:
    """Composite one antialiased shape onto `img` (float32 HxWx3) in place, on its window only."""
    hx, hy = HALF_EXTENT[shape]
    h, w = img.shape[:2]
    x0, x1 = max(0, int(math.floor(cx - hx * r - 1))), min(w, int(math.ceil(cx + hx * r + 1)))
    y0, y1 = max(0, int(math.floor(cy - hy * r - 1))), min(h, int(math.ceil(cy + hy * r + 1)))
    if x1 <= x0 or y1 <= y0:
        return
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    dx, dy = np.broadcast_arrays(dx, dy)
    cover = np.clip(0.5 - shape_sdf(shape, dx, dy, r), 0.0, 1.0)[..., None]
    win = img[y0:y1, x0:x1]
    win += cover * (rgb - win)


def object_box(shape: str, cx: float, cy: float, r: float) -> list[float]:
    """The shape's exact pixel box [x1, y1, x2, y2] (continuous geometry, not the pixel mask)."""
    hx, hy = HALF_EXTENT[shape]
    return [cx - hx * r, cy - hy * r, cx + hx * r, cy + hy * r]


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
