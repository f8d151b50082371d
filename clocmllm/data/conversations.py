"""LLaVA conversation JSON, with the referring/grounding variant, and its validation.

    [{"id": "train-000001-grd", "image": "images/000001.png",
      "task": "grounding", "width": 64, "height": 64, "boxes": [[10.5, 4.0, 30.2, 25.0]],
      "conversations": [{"from": "human", "value": "<image>\\nWhere is the red circle?"},
                        {"from": "gpt", "value": "[164, 62, 471, 390]"}]}, ...]

`image` is relative to the JSON file's folder. Plain LLaVA items have no `task`. For
`task` = referring|grounding, `boxes` are the pixel boxes of the original image in the order
their text forms `[x1, y1, x2, y2]` appear across the turns; the text form is the 0–999 grid
of the image as the model sees it, `clocmllm.boxes.to_grid(box, w, h, size=max(w, h))`
(the resize-with-pad square). In a referring chat each box in a human turn is followed by a
`<region>` token (the prompter's region feature goes there), so their counts must match.

The writer puts one item per line, so a validation problem's line number points at the item.
Readers also accept JSONL (one item per line) when the file name ends in `.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from clocmllm.boxes import box_problem, format_box, to_grid
from clocmllm.data.atomic import write_text_atomic
from clocmllm.data.problems import ProblemLog

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region>"
TASKS = ("referring", "grounding")
SPEAKERS = ("human", "gpt")
_GRID_BOX_RE = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)
_KNOWN = ("id", "image", "conversations", "task", "width", "height", "boxes")


@dataclass
class Turn:
    speaker: str  # "human" | "gpt" (the JSON key is "from")
    value: str

    def to_json(self) -> dict:
        return {"from": self.speaker, "value": self.value}


@dataclass
class Conversation:
    id: str
    turns: list[Turn]
    image: str | None = None
    task: str | None = None
    width: int | None = None
    height: int | None = None
    boxes: list[list[float]] | None = None
    extra: dict = field(default_factory=dict)
    root: str | None = None  # folder `image` is relative to; not serialised

    @property
    def image_path(self) -> str | None:
        if self.image is None or self.root is None or os.path.isabs(self.image):
            return self.image
        return os.path.join(self.root, self.image)

    def grid_boxes(self) -> list[list[int]]:
        """`boxes` on the 0–999 grid of the model's square, as they appear in the text."""
        w, h = int(self.width), int(self.height)
        return [to_grid(b, w, h, size=max(w, h)) for b in self.boxes or []]

    def to_json(self) -> dict:
        out: dict = {"id": self.id}
        if self.image is not None:
            out["image"] = self.image
        if self.task is not None:
            out["task"] = self.task
            out["width"], out["height"] = int(self.width), int(self.height)
            out["boxes"] = [[float(c) for c in b] for b in self.boxes or []]
        out.update(self.extra)
        out["conversations"] = [t.to_json() for t in self.turns]
        return out


def conversation_from_json(
    obj: object, file: str, line: int | None, problems: ProblemLog, root: str | None = None
) -> Conversation | None:
    """Validate one item; None (and every problem of that item logged) when it is bad."""
    before = len(problems.problems)

    def bad(field_name: str | None, reason: str) -> None:
        problems.add(file, line, field_name, reason)

    if not isinstance(obj, dict):
        bad(None, "an item must be a JSON object")
        return None
    uid = obj.get("id")
    if not isinstance(uid, (str, int)) or isinstance(uid, bool) or uid == "":
        bad("id", "missing or empty id")
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        bad("image", "image must be a non-empty path")
    raw_turns = obj.get("conversations")
    turns: list[Turn] = []
    if not isinstance(raw_turns, list) or not raw_turns:
        bad("conversations", "conversations must be a non-empty list of turns")
        raw_turns = []
    for t, turn in enumerate(raw_turns):
        where = f"conversations[{t}]"
        if not isinstance(turn, dict):
            bad(where, "a turn must be an object with 'from' and 'value'")
            continue
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SPEAKERS:
            bad(f"{where}.from", f"from must be 'human' or 'gpt', got {speaker!r}")
        elif speaker != SPEAKERS[t % 2]:
            bad(f"{where}.from", f"turns must alternate human/gpt starting with human; got {speaker!r}")
        if not isinstance(value, str) or not value.strip():
            bad(f"{where}.value", "empty value")
            value = ""
        turns.append(Turn(str(speaker), value))
    if turns:
        n_image = sum(t.value.count(IMAGE_TOKEN) for t in turns)
        if isinstance(image, str) and image:
            if IMAGE_TOKEN not in turns[0].value:
                bad("conversations[0].value", f"image is set but the first human turn has no {IMAGE_TOKEN}")
            elif n_image != 1:
                bad("conversations", f"{IMAGE_TOKEN} must appear once, found {n_image}")
        elif n_image:
            bad("conversations", f"{IMAGE_TOKEN} appears but the item has no image")

    task = obj.get("task")
    width = height = None
    boxes = None
    if task is not None:
        if task not in TASKS:
            bad("task", f"task must be one of {TASKS}, got {task!r}")
        width, height = obj.get("width"), obj.get("height")
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"{name} must be a positive integer, got {v!r}")
        sizes_ok = isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
        raw_boxes = obj.get("boxes")
        if not isinstance(raw_boxes, list):
            bad("boxes", "boxes must be a list of [x1, y1, x2, y2] pixel boxes")
            raw_boxes = []
        boxes = []
        for b, box in enumerate(raw_boxes):
            why = box_problem(box, width if sizes_ok else None, height if sizes_ok else None)
            if why:
                bad(f"boxes[{b}]", why)
            else:
                boxes.append([float(c) for c in box])
        if sizes_ok and len(boxes) == len(raw_boxes) and turns:
            _check_box_text(turns, boxes, width, height, task, bad)

    if len(problems.problems) > before:
        return None
    extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    return Conversation(uid, turns, image, task, width, height, boxes, extra, root)


def _check_box_text(turns: list[Turn], boxes: list[list[float]], width: int, height: int, task, bad) -> None:
    """The box texts, in order, must be `boxes` converted to the grid; referring needs <region>s."""
    found: list[tuple[int, list[float]]] = []
    for t, turn in enumerate(turns):
        for m in _GRID_BOX_RE.finditer(turn.value):
            found.append((t, [float(v) for v in m.groups()]))
    expected = [to_grid(b, width, height, size=max(width, height)) for b in boxes]
    if len(found) != len(expected):
        bad("boxes", f"{len(expected)} boxes listed but {len(found)} box texts in the turns")
    for k, ((t, got), want) in enumerate(zip(found, expected, strict=False)):  # count checked above
        if got != [float(c) for c in want]:
            shown = "[" + ", ".join(f"{c:g}" for c in got) + "]"
            bad(
                f"conversations[{t}].value",
                f"box text {shown} does not match boxes[{k}] on the 0-999 grid {format_box(want)}",
            )
    if task == "referring":
        human_boxes = sum(1 for t, _ in found if turns[t].speaker == "human")
        regions = sum(turn.value.count(REGION_TOKEN) for turn in turns if turn.speaker == "human")
        if regions != human_boxes:
            bad("conversations", f"{regions} {REGION_TOKEN} tokens for {human_boxes} boxes in the questions")


def iter_json_items(path: str | os.PathLike, problems: ProblemLog) -> Iterator[tuple[int | None, object]]:
    """(line, item) of a JSON list (or JSONL) file; a bad JSON spot is logged with its line."""
    path = str(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line, parse_constant=_nan)
                except ValueError as err:
                    problems.seen += 1
                    problems.add(path, lineno, None, f"bad JSON line: {err}")
        return
    decoder = json.JSONDecoder(parse_constant=_nan)
    lines = _LineCounter(text)
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        problems.seen += 1
        problems.add(path, lines.at(i), None, "bad JSON: a conversation file must hold a JSON list")
        return
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    while i < len(text):
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError as err:
            problems.seen += 1
            problems.add(path, lines.at(i), None, f"bad JSON: {err}; the rest of the file is not read")
            return
        yield lines.at(i), obj
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < len(text) and text[i] == "]":
            if text[i + 1 :].strip():
                problems.add(path, lines.at(i + 1), None, "bad JSON: text after the closing ]")
            return
        else:
            problems.seen += 1
            problems.add(path, lines.at(i), None, "bad JSON: expected ',' or ']' between items")
            return
    problems.add(path, lines.at(len(text)), None, "bad JSON: the list is not closed with ]")


def iter_conversations(path: str | os.PathLike, problems: ProblemLog | None = None) -> Iterator[Conversation]:
    """Valid items of a conversation file; bad ones go to `problems` (or raise if strict)."""
    problems = problems if problems is not None else ProblemLog()
    root = os.path.dirname(os.path.abspath(path))
    for line, obj in iter_json_items(path, problems):
        problems.seen += 1
        conv = conversation_from_json(obj, str(path), line, problems, root)
        if conv is not None:
            yield conv


def read_conversations(path: str | os.PathLike, problems: ProblemLog | None = None) -> list[Conversation]:
    return list(iter_conversations(path, problems))


def dumps_conversations(items: Iterable[Conversation | dict]) -> str:
    """A JSON list with one item per line (valid JSON, and line numbers name items)."""
    lines = [json.dumps(c.to_json() if isinstance(c, Conversation) else c, ensure_ascii=False) for c in items]
    if not lines:
        return "[]\n"
    return "[\n" + ",\n".join(lines) + "\n]\n"


def write_conversations(items: Iterable[Conversation | dict], path: str | os.PathLike) -> None:
    """Write atomically (temp file, then rename)."""
    write_text_atomic(path, dumps_conversations(items))


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


class _LineCounter:
    """1-based line of a character offset; offsets must not decrease (linear, not quadratic)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, i: int) -> int:
        self.line += self.text.count("\n", self.pos, i)
        self.pos = i
        return self.line


def _nan(name: str) -> float:
    return math.nan  # NaN/Infinity literals parse, then box validation reports them
