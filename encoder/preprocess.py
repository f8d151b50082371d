"""Per-image preprocessing for pretraining and evaluation: letterbox, normalise, boxes.

CLOC resizes the long side and pads instead of centre-cropping (paper, Sec. 4), so that
region boxes near the border survive. Geometry comes from `clocmllm.boxes.Letterbox`, the
one place that knows how pixels move, so boxes follow the pixels exactly.

Padding choice (the paper does not say): padded pixels hold the normalisation mean colour,
i.e. they are exactly 0 after normalisation. A zero input is what a zero-initialised or
mean-centred network treats as "nothing here", and the exported `CLIPImageProcessor`
(which cannot pad) sees no different statistics inside the image area.

numpy/PIL only: this module never imports jax, so data tools can use it alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from clocmllm.boxes import Letterbox

# OpenAI CLIP statistics (also the defaults of Hugging Face CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Resampling filter of the resize; bicubic as in CLIP's preprocessing.
RESAMPLE = Image.Resampling.BICUBIC


def letterbox_image(
    image: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN
) -> tuple[np.ndarray, Letterbox]:
    """Resize the long side to `size` and pad right/bottom with the mean colour.

    Returns the uint8 `[size, size, 3]` array and the geometry used (for the boxes).
    """
    image = image.convert("RGB")
    geom = Letterbox(image.width, image.height, size)
    rw, rh = geom.resized
    resized = image if (rw, rh) == image.size else image.resize((rw, rh), RESAMPLE)
    fill = tuple(int(round(255 * m)) for m in mean)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, (0, 0))
    return np.asarray(canvas, dtype=np.uint8), geom


def normalize(
    pixels: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> np.ndarray:
    """uint8 `[..., 3]` -> float32 `(x/255 - mean) / std`."""
    mean_a = np.asarray(mean, np.float32)
    std_a = np.asarray(std, np.float32)
    return (pixels.astype(np.float32) / 255.0 - mean_a) / std_a


def pad_value(mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """The normalised value of a padded pixel (≈0: the pad colour is the rounded mean)."""
    fill = np.asarray([round(255 * m) for m in mean], np.uint8)
    return normalize(fill, mean, std)


def preprocess_image(
    image: Image.Image,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, Letterbox]:
    """PIL image -> normalised float32 `[size, size, 3]` and its letterbox geometry."""
    pixels, geom = letterbox_image(image, size, mean)
    return normalize(pixels, mean, std), geom


def boxes_to_unit(boxes: Sequence[Sequence[float]], geom: Letterbox) -> np.ndarray:
    """Original pixel boxes -> `[n, 4]` float32 in [0, 1] of the padded square."""
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    return np.clip(np.asarray([geom.to_unit(b) for b in boxes], np.float32), 0.0, 1.0)
