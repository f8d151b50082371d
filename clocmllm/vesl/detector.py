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
- Images are preprocessed in torch (pad, antialiased bilinear resize, normalise with the processor's
  mean/std), which is several times faster than the processor's scipy path and puts pixels on the same
  geometry; `exact_preprocessing=True` uses the processor itself instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from clocmllm.vesl.nms import batched_nms


@dataclass
class Detection:
    box: list[float]  # original pixels, [x1, y1, x2, y2]
    phrase: str
    score: float


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
    OWL-ViT's (stretch). Padding is 0 after rescaling to [0, 1], as the transformers processor does."""
    out = []
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    for img in images:
        x = torch.from_numpy(_rgb_array(img)).permute(2, 0, 1).float().div_(255.0)
        _, h, w = x.shape
        if pad_square and h != w:
            side = max(h, w)
            x = F.pad(x, (0, side - w, 0, side - h), value=0.0)
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append((x - m) / s)
    return torch.stack(out)


def _rgb_array(img: Image.Image):
    import numpy as np

    return np.array(img.convert("RGB") if img.mode != "RGB" else img)  # a writable copy for torch


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

    @torch.inference_mode()
    def raw(
        self, images: list[Image.Image], phrases: list[list[str]], pixels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model outputs for a batch: `(B, P, Q)` logits and `(B, P, 4)` unit cxcywh boxes.
        `pixels` are `pixel_values(images)` when the caller prepared them already (in a thread)."""
        pixels = (self.pixel_values(images) if pixels is None else pixels).to(self.device)
        ids, mask, _ = self.tokenize(phrases)
        t0 = time.perf_counter()
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            pixel_values=pixels,
            interpolate_pos_encoding=self.interpolate,
        )
        logits, boxes = out.logits.float().cpu(), out.pred_boxes.float().cpu()
        self.model_seconds += time.perf_counter() - t0
        return logits, boxes

    def detect(
        self, images: list[Image.Image], phrases: list[list[str]], pixels: torch.Tensor | None = None
    ) -> list[list[Detection]]:
        """Boxes for each image, highest score first. Images without phrases get no boxes.
        `pixels`, optional, are `pixel_values(images)` prepared ahead (the pipeline does it in a thread)."""
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        results: list[list[Detection]] = [[] for _ in images]
        todo = [i for i, p in enumerate(phrases) if p]
        if not todo:
            return results
        sub = pixels[todo] if pixels is not None else None
        logits, boxes = self.raw([images[i] for i in todo], [phrases[i] for i in todo], sub)
        for row, i in enumerate(todo):
            results[i] = self._select(logits[row], boxes[row], images[i].size, phrases[i])
        return results

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
