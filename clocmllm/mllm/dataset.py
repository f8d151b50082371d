"""LLaVA conversation JSON (and its referring/grounding variant) -> token ids, labels, pixels.

Record: `{id, image (relative to the JSON's folder), conversations: [{from: human|gpt, value}],
task?, width?, height?, boxes?: [[x1, y1, x2, y2] pixels, in order of appearance]}`, read and
validated by `clocmllm.data.conversations`.

Boxes: when a record carries pixel `boxes`, the k-th `[..]` in its text is re-written from
`boxes[k]` through the tower's geometry (`Geometry.to_grid`), so the text always matches the
preprocessing this model uses, whatever geometry the data writer assumed. A `<region>`
token takes the box written just before it in the same message; its feature is computed from
the exact pixel box (`Geometry.to_unit`), not from the rounded grid.

Length: `<image>` expands to the tower's token count. A sample longer than `max_length` is cut
at the end; one whose image or region tokens would be cut, or that keeps no answer token, is
dropped. Both are counted (`stats`) and logged, never silent.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from clocmllm.boxes import _BOX_RE, format_box, grid_to_unit
from clocmllm.data.problems import ProblemLog
from clocmllm.mllm import templates
from clocmllm.mllm.tokenizer import IMAGE_TOKEN, REGION_TOKEN

log = logging.getLogger("clocmllm.mllm")
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Sample:
    """One conversation ready for the model (text side), before pixels are loaded."""

    input_ids: list[int]
    labels: list[int]
    image: Path | None
    region_boxes: list[list[float]]  # unit boxes of the model's square, one per <region>
    width: int
    height: int
    record: dict = field(repr=False, default_factory=dict)


def read_conversations(path: str | Path, problems: ProblemLog | None = None) -> list[dict]:
    """Valid records of a conversation JSON/JSONL as dicts (`clocmllm.data.conversations` validates;
    bad items are skipped and counted in `problems`, or raise when it is strict)."""
    from clocmllm.data.conversations import read_conversations as read_validated

    return [c.to_json() for c in read_validated(path, problems)]


class ConversationDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        path: str | Path,
        tokenizer,
        tower,
        template: str = "auto",
        max_length: int = 2048,
        problems: ProblemLog | None = None,
        image_position: str = "first",
    ):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.tower = tower
        self.template = templates.resolve(template, tokenizer)
        self.max_length = max_length
        self.problems = problems or ProblemLog()
        self.stats = {"read": 0, "kept": 0, "truncated": 0, "dropped_too_long": 0, "dropped_bad": 0}
        self.samples: list[Sample] = []
        for i, rec in enumerate(read_conversations(self.path, self.problems)):
            self.stats["read"] += 1
            try:
                sample = encode_record(
                    rec, self.path.parent, tokenizer, tower, self.template, max_length, image_position
                )
            except ValueError as err:
                self.problems.add(str(self.path), None, f"[{i}]", str(err))
                self.stats["dropped_bad"] += 1
                continue
            if sample is None:
                self.stats["dropped_too_long"] += 1
                continue
            if len(sample.input_ids) < sample.record.get("_full_length", 0):
                self.stats["truncated"] += 1
            self.samples.append(sample)
        self.stats["kept"] = len(self.samples)
        if self.stats["truncated"] or self.stats["dropped_too_long"] or self.problems.problems:
            log.warning("%s: %s; %s", self.path, self.stats, self.problems.summary())
        if not self.samples:
            raise ValueError(f"{self.path}: no usable samples ({self.stats}; {self.problems.summary()})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        s = self.samples[idx]
        item = {
            "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
            "labels": torch.tensor(s.labels, dtype=torch.long),
            "region_boxes": torch.tensor(s.region_boxes, dtype=torch.float32).reshape(-1, 4),
        }
        if s.image is not None:
            with Image.open(s.image) as im:
                item["pixel_values"], _ = self.tower.preprocess(im)
        return item


def rewrite_boxes(
    text: str, pixel_boxes: list | None, start: int, geom
) -> tuple[str, list[tuple[int, list[float]]], int]:
    """Re-write the boxes of one message on this model's grid.

    Returns (new text, [(end offset in new text, unit box)], next box index).
    """
    spans: list[tuple[int, list[float]]] = []
    out, pos, k = [], 0, start
    for m in _BOX_RE.finditer(text):
        out.append(text[pos : m.start()])
        if pixel_boxes is not None:
            if k >= len(pixel_boxes):
                raise ValueError(f"boxes: text has more boxes than the {len(pixel_boxes)} listed")
            box = [float(c) for c in pixel_boxes[k]]
            grid_text = format_box(geom.to_grid(box))
            unit = geom.to_unit(box)
        else:
            grid = [int(round(float(v))) for v in m.groups()]
            grid_text, unit = format_box(grid), grid_to_unit(grid)
        out.append(grid_text)
        spans.append((sum(len(p) for p in out), unit))
        pos, k = m.end(), k + 1
    out.append(text[pos:])
    return "".join(out), spans, k


def prepare_turns(rec: dict, geom) -> tuple[list[templates.Turn], list[list[float]]]:
    """Record -> (turns with boxes on our grid and `<image>` first, unit box per `<region>`)."""
    pixel_boxes = rec.get("boxes")
    turns: list[templates.Turn] = []
    regions: list[list[float]] = []
    k = 0
    for m in rec["conversations"]:
        text, spans, k = rewrite_boxes(m["value"], pixel_boxes, k, geom)
        for rm in re.finditer(re.escape(REGION_TOKEN), text):
            before = [u for end, u in spans if end <= rm.start()]
            if not before:
                raise ValueError("conversations: <region> with no box written before it")
            regions.append(before[-1])
        turns.append((ROLES[m["from"]], text))
    if pixel_boxes is not None and k != len(pixel_boxes):
        raise ValueError(f"boxes: {len(pixel_boxes)} listed but {k} written in the text")
    return turns, regions


def encode_record(
    rec: dict, root: Path, tokenizer, tower, template: str, max_length: int, image_position: str = "first"
) -> Sample | None:
    image = None
    width, height = int(rec.get("width") or 0), int(rec.get("height") or 0)
    if rec.get("image"):
        image = root / rec["image"]
        if not image.is_file():
            raise ValueError(f"image: {image} not found")
        if not (width and height):
            with Image.open(image) as im:
                width, height = im.size
    turns, regions = prepare_turns(rec, tower.geometry(max(width, 1), max(height, 1)))
    if image is not None:
        if not any(IMAGE_TOKEN in t for _, t in turns) or image_position != "first":
            role, text = turns[0]
            turns[0] = (role, templates.place_image(text, image_position, IMAGE_TOKEN))
    ids, labels = tokenize_segments(
        templates.segments(template, turns, tokenizer), tokenizer, tower.num_tokens
    )
    full = len(ids)
    ids, labels = truncate(ids, labels, tokenizer, max_length)
    if ids is None:
        return None
    return Sample(ids, labels, image, regions, width, height, {"_full_length": full, "id": rec.get("id")})


def tokenize_segments(
    segs: list[tuple[str, bool]], tokenizer, image_tokens: int
) -> tuple[list[int], list[int]]:
    """Segments -> ids and labels, `<image>` expanded to `image_tokens` copies, BOS first."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    seen_image = False
    for text, target in segs:
        for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
            reps = 1
            if t == image_id:
                if seen_image:
                    raise ValueError("conversations: more than one <image> (one image per sample)")
                seen_image, reps = True, image_tokens
            ids += [t] * reps
            labels += ([t] if target and t != image_id else [IGNORE_INDEX]) * reps
    return ids, labels


def truncate(ids: list[int], labels: list[int], tokenizer, max_length: int):
    if len(ids) <= max_length:
        return ids, labels
    protected = {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(REGION_TOKEN)}
    last = max((i for i, t in enumerate(ids) if t in protected), default=-1)
    if last >= max_length:
        return None, None
    ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None, None
    return ids, labels


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad ids/labels, stack pixels, pad region boxes to the batch's most."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    m = max(b["region_boxes"].shape[0] for b in batch)
    boxes = torch.zeros((len(batch), m, 4))
    box_mask = torch.zeros((len(batch), m), dtype=torch.bool)
    for i, b in enumerate(batch):
        L = len(b["input_ids"])
        ids[i, :L], labels[i, :L], mask[i, :L] = b["input_ids"], b["labels"], 1
        r = b["region_boxes"].shape[0]
        boxes[i, :r], box_mask[i, :r] = b["region_boxes"], True
    out = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "region_boxes": boxes,
        "region_mask": box_mask,
    }
    if all("pixel_values" in b for b in batch):
        out["pixel_values"] = torch.stack([b["pixel_values"] for b in batch])
    return out
