"""Referring and grounding evaluation of an MLLM on a conversation JSON.

- `grounding_acc50`: share of grounding samples whose FIRST parsed box has IoU >= 0.5 with the
  truth, computed in original pixels (the answer's grid box goes back through the model's
  geometry; the truth is the record's pixel box). Unparsable answers count as misses and
  are reported separately (`grounding_unparsable`).
- `referring_acc`: exact match after normalisation: lower case, punctuation dropped, a leading
  "it is" / "this is" / "that is" dropped (the world phrases one description several ways),
  the articles a/an/the dropped, whitespace collapsed. Our word-level tokenizer decodes with
  spaces around punctuation, so normalising punctuation away is required for a fair match.

Each sample is answered from its first user turn (single-turn evaluation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from clocmllm.boxes import _BOX_RE, iou
from clocmllm.mllm.dataset import ROLES, read_conversations
from clocmllm.mllm.inference import ChatSession

_ARTICLES = {"a", "an", "the"}


_LEADS = (("it", "is"), ("this", "is"), ("that", "is"), ("there", "is"))


def normalise(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if tuple(words[:2]) in _LEADS:
        words = words[2:]
    return " ".join(w for w in words if w not in _ARTICLES)


def draw_example(image: Image.Image, truth, pred, out: Path, min_side: int = 256) -> Path:
    """One grounding example as PNG: truth box green, predicted box red (atomic write).

    Tiny world images are upscaled (nearest) to `min_side` so the boxes stay readable.
    """
    from PIL import ImageDraw

    scale = max(1, -(-min_side // min(image.size)))
    canvas = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for box, colour in ((truth, "lime"), (pred, "red")):
        if box is not None:
            draw.rectangle([float(c) * scale for c in box], outline=colour, width=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    canvas.save(tmp, format="PNG")
    tmp.replace(out)
    return out


def task_of(rec: dict) -> str:
    if rec.get("task") in ("referring", "grounding"):
        return rec["task"]
    answer = next(m["value"] for m in rec["conversations"] if ROLES[m["from"]] == "assistant")
    return "grounding" if _BOX_RE.search(answer) else "referring"


def evaluate(
    model,
    tokenizer,
    data: str | Path,
    limit: int | None = None,
    max_new_tokens: int = 32,
    predictions: str | Path | None = None,
    progress: bool = True,
    examples: str | Path | None = None,
    num_examples: int = 8,
) -> dict:
    """Answer each record's first user turn and score it (see the module docstring).

    `examples`: a folder that receives PNGs of the first `num_examples` grounding samples,
    truth in green, prediction in red (none drawn when unparsable), for reports.
    """
    from tqdm.auto import tqdm

    data = Path(data)
    records = read_conversations(data)[:limit]
    counts = {
        "grounding": 0,
        "grounding_hits": 0,
        "grounding_parsed": 0,
        "grounding_unparsable": 0,
        "referring": 0,
        "referring_hits": 0,
    }
    rows = []
    for rec in tqdm(records, disable=not progress, desc="eval"):
        conv = rec["conversations"]
        user_idx = next(i for i, m in enumerate(conv) if ROLES[m["from"]] == "user")
        truth = conv[user_idx + 1]["value"] if user_idx + 1 < len(conv) else ""
        with Image.open(data.parent / rec["image"]) as im:
            image = im.convert("RGB")
        session = ChatSession(model, tokenizer, image, max_new_tokens=max_new_tokens)
        question = conv[user_idx]["value"]
        boxes_before = len(_BOX_RE.findall(question))
        pixel_boxes = rec.get("boxes") or []
        # The question's box (referring) is passed as a pixel box, re-written on our grid.
        box = None
        if boxes_before:
            if not pixel_boxes:
                raise ValueError(f"{data}: record {rec.get('id')}: boxes: needed to evaluate")
            box = pixel_boxes[0]
            question = (
                _BOX_RE.sub("{box}", question, count=1).replace("<region>", "").replace("{box} ", "{box}")
            )
        ans = session.ask(question.strip(), box=box)
        task = task_of(rec)
        row = {"id": rec.get("id"), "task": task, "answer": ans.text, "truth": truth}
        if task == "grounding":
            counts["grounding"] += 1
            gt = pixel_boxes[boxes_before] if len(pixel_boxes) > boxes_before else None
            if gt is None:
                raise ValueError(f"{data}: record {rec.get('id')}: boxes: no ground-truth box for the answer")
            if examples is not None and counts["grounding"] <= num_examples:
                pred = ans.pixel_boxes[0] if ans.pixel_boxes else None
                draw_example(
                    image, gt, pred, Path(examples) / f"{counts['grounding'] - 1:03d}_{rec.get('id')}.png"
                )
            if ans.pixel_boxes:
                counts["grounding_parsed"] += 1
                row["iou"] = iou(ans.pixel_boxes[0], gt)
                counts["grounding_hits"] += int(row["iou"] >= 0.5)
            else:
                counts["grounding_unparsable"] += 1
        else:
            counts["referring"] += 1
            row["hit"] = normalise(ans.text) == normalise(truth)
            counts["referring_hits"] += int(row["hit"])
        rows.append(row)
    result = {
        "samples": len(records),
        "grounding_acc50": counts["grounding_hits"] / counts["grounding"] if counts["grounding"] else None,
        "referring_acc": counts["referring_hits"] / counts["referring"] if counts["referring"] else None,
        **counts,
    }
    if predictions:
        Path(predictions).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return result
