"""Image views for clip-rocket: one weak global view plus n strong views whose boxes follow the pixels.

clip-rocket (Fini et al., TMLR 2023) contrasts, besides the standard weak view, strongly
augmented views of each image. The strong view is SimCLR's recipe: RandomResizedCrop
(scale 0.08–1, aspect 3/4–4/3), colour jitter, random grayscale, Gaussian blur, horizontal
flip. CLOC's region losses can run on those views too, so every box is carried through the
geometry (crop, resize, flip) exactly as the pixels move.

Choices (ours, the paper and SimCLR leave them open or fix them for 224 px):
- The weak view is CLOC's resize-with-pad (`preprocess.letterbox_image`), not a crop, so
  the global loss sees exactly what evaluation sees.
- The strong view's crop is stretched to the full `size x size` square (no padding), as
  RandomResizedCrop does; its boxes are in [0, 1] of that square, like the weak view's.
- A box is clipped to the crop; it stays valid only if the visible part keeps at least
  `min_visible` (0.25) of the box's original area and is at least one output pixel wide
  and high. A region mostly cut away no longer matches its text.
- Blur sigma (0.1–2.0 at 224 px in SimCLR) is scaled by `size / 224`, so a 64 px view is
  not blurred out of recognition.
- Colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, blur p=0.5, flip p=0.5:
  SimCLR/clip-rocket defaults. The four jitter ops run in a random order (torchvision's).
- Determinism: every random draw comes from the `numpy.random.Generator` passed in, in a
  fixed order (all draws are made even when an op is skipped), so a view is a pure
  function of (image, boxes, seed) and geometry does not depend on the colour settings.

numpy/PIL only (no jax, no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from clocmllm.boxes import Letterbox
from clocmllm.encoder.config import checked_fields
from clocmllm.encoder.preprocess import CLIP_MEAN, RESAMPLE, boxes_to_unit, letterbox_image


@dataclass(frozen=True)
class StrongAugment:
    """Settings of a strong view (SimCLR / clip-rocket defaults)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # at 224 px; scaled by size / 224
    flip_p: float = 0.5
    min_visible: float = 0.25

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "<dict>") -> StrongAugment:
        """Build from a YAML mapping; unknown keys are errors naming `source`."""
        data = checked_fields(cls, data, source, "augmentation")
        for key in ("scale", "ratio", "blur_sigma"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)

    def geometry_only(self) -> StrongAugment:
        """The same crops and flips without colour ops (for tests and visual checks)."""
        return StrongAugment(
            scale=self.scale,
            ratio=self.ratio,
            jitter_p=0.0,
            gray_p=0.0,
            blur_p=0.0,
            flip_p=self.flip_p,
            min_visible=self.min_visible,
        )


@dataclass(frozen=True)
class View:
    """One view: uint8 pixels [S, S, 3], boxes [M, 4] in [0, 1] of the view, valid [M]."""

    pixels: np.ndarray
    boxes: np.ndarray
    valid: np.ndarray


def crop_params(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's crop (x0, y0, w, h) in pixels: torchvision's algorithm.

    Up to 10 tries of (area share, log-uniform aspect); then the central crop clamped to
    the ratio range. Exactly 10 * 4 + 2 draws are made whatever happens (determinism).
    """
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    draws = rng.random((10, 4))
    pick = None
    for u_area, u_ratio, u_x, u_y in draws:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if pick is None and 0 < w <= width and 0 < h <= height:
            x0 = int(u_x * (width - w + 1))
            y0 = int(u_y * (height - h + 1))
            pick = (x0, y0, w, h)
    rng.random(2)  # reserved, keeps the draw count fixed
    if pick is not None:
        return pick
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_boxes(
    boxes: np.ndarray, crop: tuple[int, int, int, int], size: int, min_visible: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel boxes [M, 4] of the source -> ([M, 4] in [0, 1] of the resized crop, valid [M]).

    A box is valid when its clipped part keeps >= `min_visible` of its area and spans at
    least one output pixel each way. Invalid boxes are zeroed.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0, y0, w, h = crop
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], x0, x0 + w),
            np.clip(boxes[:, 1], y0, y0 + h),
            np.clip(boxes[:, 2], x0, x0 + w),
            np.clip(boxes[:, 3], y0, y0 + h),
        ],
        axis=1,
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    vis_w, vis_h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    visible = vis_w * vis_h
    unit = (clipped - [x0, y0, x0, y0]) / [w, h, w, h]
    valid = (
        (area > 0)
        & (visible >= min_visible * np.maximum(area, 1e-12))
        & (vis_w * size / w >= 1.0)
        & (vis_h * size / h >= 1.0)
    )
    unit = np.where(valid[:, None], unit, 0.0)
    return unit.astype(np.float32), valid


def flip_boxes(boxes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Unit boxes mirrored left-right (x -> 1 - x, corners swapped); invalid rows stay 0."""
    out = np.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], axis=1)
    return np.where(valid[:, None], out, 0.0).astype(np.float32)


def color_jitter(image: Image.Image, aug: StrongAugment, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation and hue, in a random order, from their own `rng`."""
    u = rng.random(4)
    order = rng.permutation(4)
    factors = [
        1.0 + aug.brightness * (2 * u[0] - 1),
        1.0 + aug.contrast * (2 * u[1] - 1),
        1.0 + aug.saturation * (2 * u[2] - 1),
        aug.hue * (2 * u[3] - 1),
    ]
    for op in order:
        f = factors[op]
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(f)
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(f)
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(f)
        elif f != 0.0:
            hsv = np.asarray(image.convert("HSV"), np.uint8).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(f * 255))) % 256
            image = Image.fromarray(hsv, "HSV").convert("RGB")
    return image


def strong_view(
    image: Image.Image,
    boxes: np.ndarray,
    size: int,
    rng: np.random.Generator,
    aug: StrongAugment = StrongAugment(),
) -> View:
    """One strong view of `image` with its pixel `boxes` [M, 4] carried along.

    Draw order (fixed): crop (42 draws), flip, jitter gate, jitter seed, gray, blur gate,
    blur sigma. Colour ops never move pixels, so boxes depend on crop and flip only.
    """
    image = image.convert("RGB")
    crop = crop_params(image.width, image.height, rng, aug.scale, aug.ratio)
    x0, y0, w, h = crop
    out = image.resize((size, size), RESAMPLE, box=(x0, y0, x0 + w, y0 + h))
    unit, valid = crop_boxes(boxes, crop, size, aug.min_visible)
    flip, jitter_gate = rng.random(2)
    jitter_rng = np.random.default_rng(rng.integers(2**63))
    gray, blur_gate, blur_u = rng.random(3)
    if flip < aug.flip_p:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        unit = flip_boxes(unit, valid)
    if jitter_gate < aug.jitter_p:
        out = color_jitter(out, aug, jitter_rng)
    if gray < aug.gray_p:
        out = ImageOps.grayscale(out).convert("RGB")
    if blur_gate < aug.blur_p:
        lo, hi = aug.blur_sigma
        sigma = (lo + (hi - lo) * blur_u) * size / 224
        out = out.filter(ImageFilter.GaussianBlur(radius=float(sigma)))
    return View(np.asarray(out, np.uint8), unit, valid)


def weak_view(image: Image.Image, boxes: np.ndarray, size: int, mean=CLIP_MEAN) -> View:
    """CLOC's resize-with-pad view; every box with positive area stays valid."""
    pixels, geom = letterbox_image(image, size, mean)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    unit = boxes_to_unit(boxes.tolist(), geom)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return View(pixels, unit, valid)


def unit_to_pixel_boxes(unit: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """[M, 4] boxes in [0, 1] of a letterbox square -> original pixel boxes (clipped)."""
    geom = Letterbox(width, height, size)
    return np.asarray([geom.from_unit(b) for b in np.asarray(unit).reshape(-1, 4)], np.float64).reshape(-1, 4)


def make_views(
    image: Image.Image,
    boxes: np.ndarray,
    size: int,
    n: int,
    seed: int | np.random.SeedSequence | list[int],
    aug: StrongAugment = StrongAugment(),
) -> tuple[View, list[View]]:
    """(weak view, n strong views) of one image; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    return weak_view(image, boxes, size), [strong_view(image, boxes, size, rng, aug) for _ in range(n)]
