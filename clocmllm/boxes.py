"""Box math in one place: pixel boxes, the resize-with-pad letterbox, and the 0–999 text grid.

Conventions used everywhere in clocmllm:
- A pixel box is `[x1, y1, x2, y2]` in the original image's pixel coordinates, corners as
  floats, `x2 > x1`, `y2 > y1`, inside `[0, width] x [0, height]`.
- The model sees an image resized so its long side is `size`, then padded (bottom/right)
  to `size x size` (CLOC's resize-with-pad). `Letterbox` maps boxes into and out of that
  square exactly as the pixels move.
- In text, a box is four integers on a 0–999 grid of the image *as the model sees it* (the
  padded square), written `[x1, y1, x2, y2]` (Ferret's convention). `to_grid`/`from_grid`
  are the only conversions; forgetting to rescale is the classic user mistake.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

GRID = 1000  # grid cells per side; integer coordinates run 0..GRID-1

Box = Sequence[float]


@dataclass(frozen=True)
class Letterbox:
    """Resize-long-side-then-pad geometry of one image. Padding goes right and bottom."""

    width: int
    height: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.width, self.height)

    @property
    def resized(self) -> tuple[int, int]:
        """(w, h) of the resized image before padding, rounded as the pixel resize rounds."""
        s = self.scale
        return max(1, round(self.width * s)), max(1, round(self.height * s))

    def _sx_sy(self) -> tuple[float, float]:
        rw, rh = self.resized
        return rw / self.width, rh / self.height

    def to_model(self, box: Box) -> list[float]:
        """Original pixel box -> pixel box in the padded `size x size` square."""
        sx, sy = self._sx_sy()
        x1, y1, x2, y2 = box
        return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]

    def from_model(self, box: Box) -> list[float]:
        """Pixel box in the padded square -> original pixel box (clipped to the image)."""
        sx, sy = self._sx_sy()
        x1, y1, x2, y2 = box
        out = [x1 / sx, y1 / sy, x2 / sx, y2 / sy]
        return clip_box(out, self.width, self.height)

    def to_unit(self, box: Box) -> list[float]:
        """Original pixel box -> [0, 1] coordinates of the padded square (prompter input)."""
        return [c / self.size for c in self.to_model(box)]

    def from_unit(self, box: Box) -> list[float]:
        return self.from_model([c * self.size for c in box])


def clip_box(box: Box, width: float, height: float) -> list[float]:
    x1, y1, x2, y2 = box
    return [
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    ]


def unit_to_grid(box: Box) -> list[int]:
    """[0, 1] box of the model's square -> integer 0–999 grid box (clamped)."""
    return [min(GRID - 1, max(0, int(math.floor(c * GRID)))) for c in box]


def grid_to_unit(box: Sequence[int]) -> list[float]:
    """Integer grid box -> [0, 1] box; a cell maps to its centre so round trips are stable."""
    return [(min(GRID - 1, max(0, int(c))) + 0.5) / GRID for c in box]


def to_grid(box: Box, width: int, height: int, size: int | None = None) -> list[int]:
    """Original pixel box -> 0–999 grid box of the image as the model sees it.

    With `size=None` the model sees the image stretched to a square (no padding), so each
    axis is normalised by its own length; with a `size`, the letterbox square is used.
    """
    if size is None:
        unit = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
    else:
        unit = Letterbox(width, height, size).to_unit(box)
    return unit_to_grid(unit)


def from_grid(box: Sequence[int], width: int, height: int, size: int | None = None) -> list[float]:
    """Inverse of `to_grid`: grid box -> original pixel box."""
    unit = grid_to_unit(box)
    if size is None:
        return clip_box([unit[0] * width, unit[1] * height, unit[2] * width, unit[3] * height], width, height)
    return Letterbox(width, height, size).from_unit(unit)


def format_box(box: Sequence[int]) -> str:
    """Grid box -> its text form, `[x1, y1, x2, y2]`."""
    return "[" + ", ".join(str(int(c)) for c in box) + "]"


_BOX_RE = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)


def parse_boxes(text: str) -> list[list[int]]:
    """All `[x1, y1, x2, y2]` boxes in a model answer, clamped to the grid.

    Tolerates spacing and decimals; corners given in the wrong order are swapped; a box of
    zero area after clamping is dropped. Returns [] when nothing parses: callers count that
    as an unparsable answer.
    """
    out = []
    for match in _BOX_RE.finditer(text):
        x1, y1, x2, y2 = (min(GRID - 1, max(0, int(round(float(v))))) for v in match.groups())
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        if x2 > x1 and y2 > y1:
            out.append([x1, y1, x2, y2])
    return out


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def box_problem(box: object, width: float | None = None, height: float | None = None) -> str | None:
    """Why a pixel box is invalid, or None. Used by every reader's validation."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return "box must be a list of 4 numbers [x1, y1, x2, y2]"
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in box):
        return "box coordinates must be numbers"
    if any(math.isnan(c) or math.isinf(c) for c in box):
        return "box has NaN or infinite coordinates"
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return f"box has x2<=x1 or y2<=y1: {list(box)}"
    if min(x1, y1) < 0 or (width is not None and x2 > width) or (height is not None and y2 > height):
        return f"box {list(box)} lies outside the image ({width}x{height})"
    return None
