"""LLaVA conversation JSON (and its referring/grounding variant) -> token ids, labels, pixels.

Record: `{id, image (relative to the JSON's folder), conversations: [{from: human|gpt, value}],
task?, width?, height?, boxes?: [[x1, y1, x2, y2] pixels, in order of appearance]}`, read and
validated by `clocmllm.data.conversations`.

Boxes: when a record carries pixel `boxes`, the k-th `[..]` in its text is re-written from
`boxes[k]` through the tower's geometry (`Geometry.to_grid`), so the text always matches the
preprocessing this model uses, whatever geometry the data writer assumed. A `<region>`
token takes the box written just before it in the same message; its feature is computed from
the exact pixel box (`Geometry.to_unit`), not from the rounded grid.

Proposal grounding (`proposer` given, see `proposer.py`): every image's K proposals are
computed once, up front; the first user message lists the candidates `<r0> ... <rK-1>` right
after `<image>`, and each box an answer writes becomes the name of its candidate (a missed
object replaces the least confident proposal in training, counted as `candidates_injected`).

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
    candidate_boxes: list[list[float]] = field(default_factory=list)  # K unit boxes, or none
    candidate_scores: list[float] = field(default_factory=list)  # the proposer's confidence in each


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
        proposer=None,
        candidate_position: str = "after_image",
        dual_grounding: str | None = None,
    ):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.tower = tower
        self.template = templates.resolve(template, tokenizer)
        self.max_length = max_length
        self.problems = problems or ProblemLog()
        self.stats = {"read": 0, "kept": 0, "truncated": 0, "dropped_too_long": 0, "dropped_bad": 0}
        self.samples: list[Sample] = []
        records = read_conversations(self.path, self.problems)
        if dual_grounding:
            duals = [d for rec in records if (d := dual_grounding_record(rec, dual_grounding)) is not None]
            self.stats["dual_grounding"] = len(duals)
            records = records + duals
        proposals = propose_all(records, self.path.parent, tower, proposer) if proposer is not None else {}
        if proposer is not None:
            self.stats["candidates_injected"] = 0
        for i, rec in enumerate(records):
            self.stats["read"] += 1
            try:
                cands = proposals.get(rec.get("image")) if proposer is not None else None
                if proposer is not None and rec.get("image") and cands is None:
                    raise ValueError(f"image: {rec['image']} could not be read for proposals")
                sample = encode_record(
                    rec, self.path.parent, tokenizer, tower, self.template, max_length, image_position,
                    candidates=cands, candidate_position=candidate_position,
                )  # fmt: skip
            except ValueError as err:
                self.problems.add(str(self.path), None, f"[{i}]", str(err))
                self.stats["dropped_bad"] += 1
                continue
            if sample is None:
                self.stats["dropped_too_long"] += 1
                continue
            if len(sample.input_ids) < sample.record.get("_full_length", 0):
                self.stats["truncated"] += 1
            if proposer is not None:
                self.stats["candidates_injected"] += sample.record.get("_injected", 0)
            self.samples.append(sample)
        self.stats["kept"] = len(self.samples)
        if self.stats["truncated"] or self.stats["dropped_too_long"] or self.problems.problems:
            log.warning("%s: %s; %s", self.path, self.stats, self.problems.summary())
        elif proposer is not None:
            log.info("%s: %s (answers no proposal covered, given as candidates)", self.path, self.stats)
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
            "candidate_boxes": torch.tensor(s.candidate_boxes, dtype=torch.float32).reshape(-1, 4),
            "candidate_scores": torch.tensor(s.candidate_scores, dtype=torch.float32).reshape(-1),
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


def dual_grounding_record(rec: dict, template: str) -> dict | None:
    """A referring record turned around (Shikra's REG -> REC duality): each "[box] <region>"
    question with a plain-text answer becomes `template.format(phrase=answer)` answered by the
    box. The phrase is the answer as the referring metric normalises it (`evaluate.normalise`:
    lower case, no punctuation, articles or leading "it is"). None when the record has no such
    turn (or no pixel boxes to answer with).
    """
    from clocmllm.mllm.evaluate import normalise  # evaluate imports this module

    boxes, conv = rec.get("boxes"), rec["conversations"]
    if not boxes or rec.get("task") == "grounding":
        return None
    turns, k = [], 0
    for q, a in zip(conv[0::2], conv[1::2], strict=False):
        n_q, n_a = len(_BOX_RE.findall(q["value"])), len(_BOX_RE.findall(a["value"]))
        if n_q == 1 and n_a == 0 and REGION_TOKEN in q["value"] and k < len(boxes):
            phrase = normalise(a["value"])
            if phrase:
                turns.append((template.format(phrase=phrase), boxes[k]))
        k += n_q + n_a
    if not turns:
        return None
    conversations = []
    for i, (question, _) in enumerate(turns):
        conversations.append({"from": "human", "value": (f"{IMAGE_TOKEN}\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": "[0, 0, 0, 0]"})  # re-written from `boxes`
    out = {key: v for key, v in rec.items() if key not in ("conversations", "boxes", "task", "id")}
    return {**out, "id": f"{rec.get('id')}-dual", "task": "grounding", "conversations": conversations,
            "boxes": [b for _, b in turns]}  # fmt: skip


def propose_all(records: list[dict], root: Path, tower, proposer, batch: int = 128) -> dict:
    """image (as the record names it) -> (K unit boxes, scores) of the frozen proposer.

    Unreadable images are left out (the caller reports the record); progress is shown.
    """
    from tqdm.auto import tqdm

    from clocmllm.mllm.proposer import last_patches

    names = sorted({r["image"] for r in records if r.get("image")})
    out: dict = {}
    for i in tqdm(range(0, len(names), batch), desc="proposals", disable=len(names) <= batch):
        pix, ok = [], []
        for name in names[i : i + batch]:
            try:
                with Image.open(root / name) as im:
                    pix.append(tower.preprocess(im)[0])
                ok.append(name)
            except (OSError, ValueError):
                continue
        if ok:
            boxes, scores = proposer.propose(last_patches(tower, torch.stack(pix)))
            out.update({n: (b, s) for n, b, s in zip(ok, boxes, scores, strict=True)})
    return out


def name_answer_boxes(
    turns: list[templates.Turn], boxes, scores, grid: int, inject: bool, position: str = "after_image"
) -> tuple[list[templates.Turn], list[list[float]], list[float], int]:
    """Assistant boxes -> candidate names; the first user turn gets the candidate list.

    Returns (turns, K candidate unit boxes in reading order, their confidences, answers injected).
    """
    from clocmllm.mllm.proposer import candidate_tokens, name_candidates

    answers = [
        grid_to_unit([int(v) for v in m.groups()])
        for role, text in turns
        if role == "assistant"
        for m in _BOX_RE.finditer(text)
    ]
    cands, conf, names, injected = name_candidates(answers, boxes, scores, grid, inject)
    tokens = candidate_tokens(len(cands))
    it = iter(names)
    out: list[templates.Turn] = []
    first_user = True
    for role, text in turns:
        if role == "assistant":
            text = _BOX_RE.sub(lambda _m: tokens[next(it)], text)
        elif first_user:
            text, first_user = templates.insert_candidates(text, len(cands), position), False
        out.append((role, text))
    return out, cands.tolist(), conf.tolist(), injected


def encode_record(
    rec: dict,
    root: Path,
    tokenizer,
    tower,
    template: str,
    max_length: int,
    image_position: str = "first",
    candidates: tuple | None = None,
    inject: bool = True,
    candidate_position: str = "after_image",
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
    cand_boxes: list[list[float]] = []
    cand_scores: list[float] = []
    injected = 0
    if candidates is not None:
        turns, cand_boxes, cand_scores, injected = name_answer_boxes(
            turns, *candidates, tower.grid, inject, candidate_position
        )
    ids, labels = tokenize_segments(
        templates.segments(template, turns, tokenizer), tokenizer, tower.num_tokens
    )
    full = len(ids)
    ids, labels = truncate(ids, labels, tokenizer, max_length)
    if ids is None:
        return None
    meta = {"_full_length": full, "id": rec.get("id"), "_injected": injected}
    return Sample(ids, labels, image, regions, width, height, meta, cand_boxes, cand_scores)


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
    k = max(b["candidate_boxes"].shape[0] for b in batch) if "candidate_boxes" in batch[0] else 0
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
    if k:  # samples without candidates (text only) get zero boxes their tokens never read
        cands = torch.zeros((len(batch), k, 4))
        conf = torch.full((len(batch), k), 0.5)
        for i, b in enumerate(batch):
            cands[i, : b["candidate_boxes"].shape[0]] = b["candidate_boxes"]
            conf[i, : b["candidate_scores"].shape[0]] = b["candidate_scores"]
        out["candidate_boxes"], out["candidate_scores"] = cands, conf
    if all("pixel_values" in b for b in batch):
        out["pixel_values"] = torch.stack([b["pixel_values"] for b in batch])
    return out
