"""Region-text records: one JSON line per image, next to the images.

    {"image": "images/000001.png", "width": 64, "height": 64,
     "caption": "a small red circle and a large blue square on a gray background",
     "regions": [{"box": [x1, y1, x2, y2], "text": "small red circle"}, ...]}

`image` is relative to the JSONL file's folder (or absolute). `box` is in pixels of the
original image. `width`/`height` are optional but let validation run without decoding.
Extra keys are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from clocmllm.boxes import box_problem
from clocmllm.data.atomic import write_jsonl_atomic
from clocmllm.data.jsonl import iter_json_lines
from clocmllm.data.problems import ProblemLog


@dataclass
class Region:
    box: list[float]
    text: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"box": [float(c) for c in self.box], "text": self.text, **self.extra}


@dataclass
class RegionRecord:
    image: str
    caption: str
    regions: list[Region] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    extra: dict = field(default_factory=dict)
    root: str | None = None  # folder that `image` is relative to; not serialised

    @property
    def image_path(self) -> str:
        if self.root is None or os.path.isabs(self.image):
            return self.image
        return os.path.join(self.root, self.image)

    def to_json(self) -> dict:
        out = {"image": self.image}
        if self.width is not None:
            out["width"], out["height"] = int(self.width), int(self.height)
        out["caption"] = self.caption
        out["regions"] = [r.to_json() for r in self.regions]
        out.update(self.extra)
        return out


def record_from_json(
    obj: object, file: str, line: int, problems: ProblemLog, root: str | None
) -> RegionRecord | None:
    """Parse and validate one decoded JSON object; None (and a logged problem) if bad."""
    if not isinstance(obj, dict):
        problems.add(file, line, None, "a record must be a JSON object")
        return None
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        problems.add(file, line, "image", "missing or empty image path")
        return None
    caption = obj.get("caption", "")
    if not isinstance(caption, str):
        problems.add(file, line, "caption", "caption must be a string")
        return None
    width, height = obj.get("width"), obj.get("height")
    for name, v in (("width", width), ("height", height)):
        if v is not None and (not isinstance(v, int) or v <= 0):
            problems.add(file, line, name, f"{name} must be a positive integer, got {v!r}")
            return None
    raw_regions = obj.get("regions", [])
    if not isinstance(raw_regions, list):
        problems.add(file, line, "regions", "regions must be a list")
        return None
    # Every bad region of the record is reported (not only the first), then the record is skipped.
    regions, bad = [], False
    for i, reg in enumerate(raw_regions):
        where = f"regions[{i}]"
        if not isinstance(reg, dict):
            problems.add(file, line, where, "a region must be an object with box and text")
            bad = True
            continue
        why = box_problem(reg.get("box"), width, height)
        if why:
            problems.add(file, line, f"{where}.box", why)
            bad = True
        text = reg.get("text")
        if not isinstance(text, str) or not text.strip():
            problems.add(file, line, f"{where}.text", "empty region text")
            bad = True
        if not bad:
            extra = {k: v for k, v in reg.items() if k not in ("box", "text")}
            regions.append(Region([float(c) for c in reg["box"]], text, extra))
    if bad:
        return None
    extra = {k: v for k, v in obj.items() if k not in ("image", "caption", "regions", "width", "height")}
    return RegionRecord(image, caption, regions, width, height, extra, root)


def iter_region_jsonl(path: str | os.PathLike, problems: ProblemLog | None = None) -> Iterator[RegionRecord]:
    """Yield valid records of a JSONL file; bad lines go to `problems` (or raise if strict).

    Images are not decoded here (that is the input pipeline's job, which reports a corrupt
    image through the same ProblemLog); `clocmllm data check` decodes them.
    """
    problems = problems if problems is not None else ProblemLog()
    path = str(path)
    root = os.path.dirname(os.path.abspath(path))
    for lineno, obj in iter_json_lines(path, problems):
        rec = record_from_json(obj, path, lineno, problems, root)
        if rec is not None:
            yield rec


def read_region_jsonl(path: str | os.PathLike, problems: ProblemLog | None = None) -> list[RegionRecord]:
    return list(iter_region_jsonl(path, problems))


def write_region_jsonl(records: Iterable[RegionRecord], path: str | os.PathLike) -> int:
    """Write records atomically (temp file, then rename). Returns the count written."""
    return write_jsonl_atomic(path, (rec.to_json() for rec in records))
