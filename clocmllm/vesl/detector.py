"""VESL step 3: open-vocabulary boxes for each image's phrases with OWLv2 (or OWL-ViT).

Geometry, the part that is easy to get wrong:
- OWLv2 pads each image to a square (right and bottom) and then resizes the square to
  `image_size`; its boxes are `(cx, cy, w, h)` in [0, 1] of that padded square. In original
  pixels a unit coordinate is therefore `u * max(width, height)` on *both* axes.
- OWL-ViT stretches the image to the square (no padding): `x * width`, `y * height`.
Boxes are then clipped to the image; a box that lies wholly in the padding is dropped.

Choices (ours where the paper is silent):
- `image_size` 448 (the paper's); when it differs from the checkpoint's size the model runs with
  `interpolate_pos_encoding=True`, as transformers supports for OWL models.
- Each box takes its most confident phrase (the paper) and is kept if that score (sigmoid of the
  logit) is at least `threshold` (0.1, the paper). Then NMS per phrase at IoU 0.5 (`nms_iou`), so one
  object is not listed many times under one phrase; boxes of different phrases may overlap.
- Images are preprocessed in torch (pad, antialiased bilinear resize on uint8, normalise with the
  processor's mean/std), which is several times faster than the processor's scipy path and puts pixels
  on the same geometry; `exact_preprocessing=True` uses the processor itself instead.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clocmllm.vesl.nms import batched_nms


@dataclass
class Detection:
    box: list[float]  # original pixels, [x1, y1, x2, y2]
    phrase: str
    score: float


@dataclass
class OwlInputs:
    """A batch made ready for the model by `OwlDetector.prepare`. Only images with at least one
    phrase (`rows`) go through the model; the others get no boxes."""

    sizes: list[tuple[int, int]]  # (width, height) of every image of the batch
    phrases: list[list[str]]
    rows: list[int]
    pixels: torch.Tensor | None = None  # (len(rows), 3, S, S)
    input_ids: torch.Tensor | None = None  # (len(rows) * Q, text length), Q = most phrases in a row
    attention_mask: torch.Tensor | None = None


def owl_boxes_to_pixels(cxcywh: torch.Tensor, width: int, height: int, pad_square: bool) -> torch.Tensor:
    """`(N, 4)` unit `(cx, cy, w, h)` of the model's square -> `(N, 4)` corner boxes in original pixels,
    clipped to the image. `pad_square=True` for OWLv2 (padded), False for OWL-ViT (stretched)."""
    cx, cy, w, h = cxcywh.unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    if pad_square:
        side = float(max(width, height))
        scale = torch.tensor([side, side, side, side], dtype=corners.dtype)
    else:
        scale = torch.tensor([width, height, width, height], dtype=corners.dtype)
    px = corners * scale
    limit = torch.tensor([width, height, width, height], dtype=px.dtype)
    return torch.minimum(px.clamp(min=0), limit)


def preprocess_images(
    images: list[Image.Image], size: int, mean: list[float], std: list[float], pad_square: bool
) -> torch.Tensor:
    """PIL images -> `(B, 3, size, size)` normalised pixels, OWLv2's geometry (pad, then resize) or
    OWL-ViT's (stretch). Padding is 0 after rescaling to [0, 1], as the transformers processor does.

    The resize runs on uint8 pixels in channels-last layout (torch's vectorised antialiased kernel),
    then rounds to uint8 as Pillow does: 2.7x less CPU than resizing float32 (thread CPU 4.1 against
    11.0 ms an image on the benchmark's photos), for at most 1/255 difference in any pixel."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None] * 255.0
    s = torch.tensor(std, dtype=torch.float32)[:, None, None] * 255.0
    out = torch.empty(len(images), 3, size, size)
    for j, img in enumerate(images):
        rgb = _rgb_array(img, pad_square)
        x = torch.from_numpy(rgb)[None].permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out[j] = (y.float() - m) / s
    return out


def _rgb_array(img: Image.Image, pad_square: bool = False) -> np.ndarray:
    """`(H, W, 3)` uint8, a writable copy for torch; zero-padded right and bottom to a square if asked."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    h, w, _ = arr.shape
    if not pad_square or h == w:
        return arr.copy()
    side = max(h, w)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[:h, :w] = arr
    return square


class OwlDetector:
    """OWLv2 / OWL-ViT from a local folder; `detect(images, phrases)` -> boxes per image."""

    def __init__(
        self,
        folder: str | os.PathLike,
        image_size: int = 448,
        threshold: float = 0.1,
        nms_iou: float = 0.5,
        max_regions: int | None = None,
        device: str = "cpu",
        exact_preprocessing: bool = False,
    ):
        import transformers as tf

        folder = str(folder)
        config = tf.AutoConfig.from_pretrained(folder)
        if config.model_type == "owlv2":
            self.model = tf.Owlv2ForObjectDetection.from_pretrained(folder)
            self.pad_square = True
        elif config.model_type == "owlvit":
            self.model = tf.OwlViTForObjectDetection.from_pretrained(folder)
            self.pad_square = False
        else:
            raise ValueError(
                f"{folder}: config.json model_type is {config.model_type!r}; expected owlv2 or owlvit"
            )
        self.model.to(device).eval()
        self.processor = tf.AutoProcessor.from_pretrained(folder)
        self.tokenizer = self.processor.tokenizer
        self.device = device
        self.image_size = int(image_size)
        self.threshold = float(threshold)
        self.nms_iou = float(nms_iou)
        self.max_regions = max_regions
        self.exact_preprocessing = exact_preprocessing
        self.text_length = int(config.text_config.max_position_embeddings)
        self.interpolate = self.image_size != int(config.vision_config.image_size)
        ip = self.processor.image_processor
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)
        self.model_seconds = 0.0  # time inside model forward passes (for the overhead benchmark)
        # prepare() runs in the pipeline's loader thread and, for captioned batches, in the main one;
        # a fast tokenizer's Rust object must not be used by two threads at once.
        self._tokenizer_lock = threading.Lock()

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        if self.exact_preprocessing:
            size = {"height": self.image_size, "width": self.image_size}
            kwargs = {"size": size} if self.pad_square else {"size": size, "crop_size": size}
            rgb = [im.convert("RGB") for im in images]
            return self.processor.image_processor(rgb, return_tensors="pt", **kwargs)["pixel_values"]
        return preprocess_images(images, self.image_size, self.mean, self.std, self.pad_square)

    def tokenize(self, phrases: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Queries of all images, padded to the batch's largest phrase count with all-zero rows,
        which the OWL models mask out (`query_mask = input_ids[..., 0] > 0`)."""
        q = max(len(p) for p in phrases)
        flat = [ph for p in phrases for ph in p]
        enc = self.tokenizer(
            flat, padding="max_length", truncation=True, max_length=self.text_length, return_tensors="pt"
        )
        ids = torch.zeros(len(phrases), q, self.text_length, dtype=torch.long)
        mask = torch.zeros(len(phrases), q, self.text_length, dtype=torch.long)
        i = 0
        for b, p in enumerate(phrases):
            ids[b, : len(p)] = enc["input_ids"][i : i + len(p)]
            mask[b, : len(p)] = enc["attention_mask"][i : i + len(p)]
            i += len(p)
        return ids.flatten(0, 1), mask.flatten(0, 1), q

    def prepare(
        self, images: list[Image.Image], phrases: list[list[str]], pixels: torch.Tensor | None = None
    ) -> OwlInputs:
        """Everything a batch needs before the forward pass (pixels, query tokens), so that a loader
        thread can do it while the model runs on the previous batch. `pixels`, optional, are
        `pixel_values(images)` made earlier (e.g. before the captions were known)."""
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        rows = [i for i, p in enumerate(phrases) if p]
        inputs = OwlInputs([im.size for im in images], [list(p) for p in phrases], rows)
        if not rows:
            return inputs
        if pixels is None:
            pixels = self.pixel_values([images[i] for i in rows])
        elif len(rows) < len(images):
            pixels = pixels[rows]  # no copy when every image has phrases (the usual case)
        with self._tokenizer_lock:
            ids, mask, _ = self.tokenize([phrases[i] for i in rows])
        inputs.pixels, inputs.input_ids, inputs.attention_mask = pixels, ids, mask
        return inputs

    @torch.inference_mode()
    def forward(self, inputs: OwlInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The model call. `model_seconds` counts the forward pass and bringing logits and boxes back
        to the CPU (which on a GPU waits for the forward to finish), not the copy of the inputs."""
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        pixels = inputs.pixels.to(self.device)
        t0 = time.perf_counter()
        out = self.model(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, interpolate_pos_encoding=self.interpolate
        )
        logits, boxes = out.logits.float().cpu(), out.pred_boxes.float().cpu()
        self.model_seconds += time.perf_counter() - t0
        return logits, boxes

    def postprocess(
        self, inputs: OwlInputs, logits: torch.Tensor, boxes: torch.Tensor
    ) -> list[list[Detection]]:
        """Threshold, pixel geometry and NMS for each image of a `forward` result."""
        results: list[list[Detection]] = [[] for _ in inputs.sizes]
        for row, i in enumerate(inputs.rows):
            results[i] = self._select(logits[row], boxes[row], inputs.sizes[i], inputs.phrases[i])
        return results

    def run(self, inputs: OwlInputs) -> list[list[Detection]]:
        """`forward` + `postprocess` of a prepared batch; images without phrases skip the model."""
        if not inputs.rows:
            return [[] for _ in inputs.sizes]
        return self.postprocess(inputs, *self.forward(inputs))

    def raw(
        self, images: list[Image.Image], phrases: list[list[str]], pixels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model outputs for a batch whose images all have phrases: `(B, P, Q)` logits and `(B, P, 4)`
        unit cxcywh boxes."""
        if not all(phrases):
            raise ValueError("raw() needs at least one phrase for every image")
        return self.forward(self.prepare(images, phrases, pixels))

    def detect(
        self, images: list[Image.Image], phrases: list[list[str]], pixels: torch.Tensor | None = None
    ) -> list[list[Detection]]:
        """Boxes for each image, highest score first. Images without phrases get no boxes.
        `pixels`, optional, are `pixel_values(images)` prepared ahead."""
        return self.run(self.prepare(images, phrases, pixels))

    def _select(self, logits: torch.Tensor, boxes: torch.Tensor, wh: tuple[int, int], phrases: list[str]):
        logits = logits[:, : len(phrases)]
        scores, labels = torch.sigmoid(logits).max(dim=-1)
        keep = scores >= self.threshold
        if not keep.any():
            return []
        width, height = wh
        # Rounded to 1/100 pixel before the area check, so no written box has zero width.
        px = torch.round(owl_boxes_to_pixels(boxes[keep], width, height, self.pad_square) * 100) / 100
        scores, labels = scores[keep], labels[keep]
        area_ok = (px[:, 2] > px[:, 0]) & (px[:, 3] > px[:, 1])
        px, scores, labels = px[area_ok], scores[area_ok], labels[area_ok]
        kept = batched_nms(px, scores, labels, self.nms_iou)
        if self.max_regions is not None:
            kept = kept[: self.max_regions]
        boxes_l, scores_l, labels_l = px[kept].tolist(), scores[kept].tolist(), labels[kept].tolist()
        return [
            Detection([round(c, 2) for c in b], phrases[lab], round(sc, 4))
            for b, sc, lab in zip(boxes_l, scores_l, labels_l, strict=True)
        ]
