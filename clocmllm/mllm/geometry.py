"""How an original image maps onto the square the vision tower sees, for both preprocessings.

Two modes, one interface (`to_unit` / `from_unit` on pixel boxes, `apply` on PIL images):

- `letterbox`: CLOC's resize-long-side-then-pad (padding right/bottom), the geometry of
  `clocmllm.boxes.Letterbox`, which is reused as is.
- `pad`: LLaVA-1.5's `expand2square`: pad the short side *centred* with the mean colour to a
  square of the long side, then resize that square to `size`. The offset is
  `(long - short) // 2`, exactly as LLaVA pastes the image.

Every box that enters or leaves the model goes through `Geometry.to_grid` / `from_grid`
here, so the "forgot to rescale" mistake has a single place to be wrong and be tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from clocmllm.boxes import Letterbox, clip_box, grid_to_unit, unit_to_grid

PREPROCESS_MODES = ("letterbox", "pad")


@dataclass(frozen=True)
class Geometry:
    width: int
    height: int
    size: int
    mode: str = "letterbox"

    def __post_init__(self) -> None:
        if self.mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {self.mode!r}")

    @property
    def _pad_offset(self) -> tuple[int, int]:
        side = max(self.width, self.height)
        return (side - self.width) // 2, (side - self.height) // 2

    def to_unit(self, box: Sequence[float]) -> list[float]:
        """Original pixel box -> [0, 1] box of the model's square."""
        if self.mode == "letterbox":
            return Letterbox(self.width, self.height, self.size).to_unit(box)
        side = max(self.width, self.height)
        dx, dy = self._pad_offset
        x1, y1, x2, y2 = box
        return [(x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side]

    def from_unit(self, box: Sequence[float]) -> list[float]:
        """[0, 1] box of the model's square -> original pixel box, clipped to the image."""
        if self.mode == "letterbox":
            return Letterbox(self.width, self.height, self.size).from_unit(box)
        side = max(self.width, self.height)
        dx, dy = self._pad_offset
        x1, y1, x2, y2 = (c * side for c in box)
        return clip_box([x1 - dx, y1 - dy, x2 - dx, y2 - dy], self.width, self.height)

    def to_grid(self, box: Sequence[float]) -> list[int]:
        return unit_to_grid(self.to_unit(box))

    def from_grid(self, box: Sequence[int]) -> list[float]:
        return self.from_unit(grid_to_unit(box))

    def apply(self, image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
        """The `size x size` RGB image the tower sees."""
        image = image.convert("RGB")
        if self.mode == "letterbox":
            lb = Letterbox(self.width, self.height, self.size)
            resized = image.resize(lb.resized, Image.BICUBIC)
            canvas = Image.new("RGB", (self.size, self.size), fill)
            canvas.paste(resized, (0, 0))
            return canvas
        side = max(self.width, self.height)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, self._pad_offset)
        return canvas.resize((self.size, self.size), Image.BICUBIC)
