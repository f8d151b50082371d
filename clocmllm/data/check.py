"""Dataset validation behind `clocmllm data check`: every problem, with file, line and field.

`check_dataset(path)` accepts a region JSONL, a conversation JSON (or JSONL), a world folder,
or any folder holding such files (found recursively; `images/` folders are not walked).
Beyond what the readers check, it decodes each referenced image once (PIL, fully loaded, so a
truncated file is caught) and checks boxes and declared width/height against the real size;
`decode_images=False` only checks that the image files exist. A world folder's `world.json`
counts are compared with the files. Strict mode raises a DataError at the first problem.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clocmllm.boxes import box_problem
from clocmllm.data.conversations import conversation_from_json, iter_json_items
from clocmllm.data.jsonl import reject_constant
from clocmllm.data.problems import Problem, ProblemLog, _sample_key
from clocmllm.data.regions import record_from_json

REGION_FILE_SUFFIXES = (".jsonl",)
CONVERSATION_SUFFIXES = (".json", ".jsonl")
_SKIP_DIRS = {"images", "__pycache__"}


@dataclass
class FileReport:
    path: str
    kind: str  # "regions" | "conversations" | "world"
    items: int = 0


@dataclass
class CheckReport:
    files: list[FileReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    images_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts_by_field(self) -> Counter:
        """Problems per field, with list indices folded (`regions[3].box` -> `regions[].box`)."""
        return Counter(re.sub(r"\[\d+\]", "[]", p.field or "(record)") for p in self.problems)

    def summary(self) -> str:
        kinds = Counter(f.kind for f in self.files)
        items = Counter()
        for f in self.files:
            items[f.kind] += f.items
        parts = [f"{kinds[k]} {k} file(s), {items[k]} items" for k in sorted(kinds)]
        head = "checked " + ("; ".join(parts) if parts else "nothing") + f"; {self.images_checked} images"
        if self.ok:
            return head + "; no problems"
        by_field = ", ".join(f"{k}: {v}" for k, v in self.counts_by_field().most_common())
        return (
            head
            + f"; {len(self.problems)} problem(s) in {len({_sample_key(p) for p in self.problems})} item(s) ({by_field})"
        )


class _ImageSizes:
    """Decodes each image once; remembers its size or why it could not be read."""

    def __init__(self, decode: bool):
        self.decode = decode
        self.cache: dict[str, tuple[int, int] | str | None] = {}

    def size(self, path: str) -> tuple[int, int] | str | None:
        """(w, h), an error string, or None when not decoded (exists, decode off)."""
        if path not in self.cache:
            self.cache[path] = self._read(path)
        return self.cache[path]

    def _read(self, path: str):
        if not os.path.isfile(path):
            return "missing image file"
        if not self.decode:
            return None
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
                return im.size
        except Exception as err:  # PIL raises many types for corrupt data
            return f"corrupt image: {type(err).__name__}: {err}"


def _check_image(
    path: str | None,
    declared: tuple,
    boxes: list,
    file: str,
    line,
    log: ProblemLog,
    images: _ImageSizes,
    box_field,
) -> None:
    if path is None:
        return
    got = images.size(path)
    if isinstance(got, str):
        log.add(file, line, "image", f"{got}: {path}")
        return
    if got is None:
        return
    w, h = got
    dw, dh = declared
    if dw is not None and (dw, dh) != (w, h):
        log.add(file, line, "width", f"declared {dw}x{dh} but the image is {w}x{h}")
    for i, box in enumerate(boxes):
        why = box_problem(box, w, h)
        if why:
            log.add(file, line, box_field(i), f"{why} (real image size {w}x{h})")


def _classify(path: Path) -> str | None:
    """What a file holds, from its name and its first item."""
    if path.name == "world.json":
        return "world"
    if path.suffix not in (".json", ".jsonl"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return None
    if path.suffix == ".json":
        return "conversations" if head.lstrip().startswith("[") else None
    first = next((line for line in head.splitlines() if line.strip()), "")
    return "conversations" if '"conversations"' in first else "regions"


def check_regions(path: str, log: ProblemLog, images: _ImageSizes) -> FileReport:
    report = FileReport(path, "regions")
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            report.items += 1
            log.seen += 1
            try:
                obj = json.loads(text, parse_constant=reject_constant)
            except ValueError as err:
                log.add(path, lineno, None, f"bad JSON line: {err}")
                continue
            rec = record_from_json(obj, path, lineno, log, root)
            if rec is not None:
                boxes = [r.box for r in rec.regions]
                _check_image(
                    rec.image_path,
                    (rec.width, rec.height),
                    boxes,
                    path,
                    lineno,
                    log,
                    images,
                    lambda i: f"regions[{i}].box",
                )
            elif isinstance(obj, dict) and isinstance(obj.get("image"), str) and obj["image"]:
                # The record is bad already; still say whether its image is missing or corrupt.
                image = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(root, obj["image"])
                _check_image(image, (None, None), [], path, lineno, log, images, str)
    return report


def check_conversations(path: str, log: ProblemLog, images: _ImageSizes) -> FileReport:
    report = FileReport(path, "conversations")
    root = os.path.dirname(os.path.abspath(path))
    for line, obj in iter_json_items(path, log):
        report.items += 1
        log.seen += 1
        conv = conversation_from_json(obj, path, line, log, root)
        if conv is not None and conv.image is not None:
            declared = (conv.width, conv.height)
            _check_image(
                conv.image_path, declared, conv.boxes or [], path, line, log, images, lambda i: f"boxes[{i}]"
            )
    return report


def check_world(path: Path, log: ProblemLog, images: _ImageSizes, reports: list[FileReport]) -> None:
    meta_path = str(path / "world.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        log.add(meta_path, getattr(err, "lineno", None), None, f"unreadable world.json: {err}")
        return
    reports.append(FileReport(meta_path, "world", 1))
    for split, n in (meta.get("splits") or {}).items():
        for name, checker in (("regions.jsonl", check_regions), ("conversations.json", check_conversations)):
            file = path / split / name
            if not file.is_file():
                log.add(str(file), None, None, f"missing: world.json lists split {split!r}")
                continue
            rep = checker(str(file), log, images)
            reports.append(rep)
            want = (meta.get("counts", {}).get(split, {}) or {}).get(
                "images" if name == "regions.jsonl" else "conversations"
            )
            if want is not None and rep.items != want:
                log.add(
                    meta_path,
                    None,
                    f"counts.{split}",
                    f"world.json says {want} items in {name}, the file has {rep.items}",
                )
        if n is not None and (meta.get("counts", {}).get(split, {}) or {}).get("images") not in (None, n):
            log.add(meta_path, None, f"splits.{split}", "splits and counts disagree")


def check_dataset(path: str | os.PathLike, decode_images: bool = True, strict: bool = False) -> CheckReport:
    """Validate a file or folder; see the module docstring. Never stops at the first problem
    unless `strict`, where the first problem raises `DataError` naming file, line and field."""
    p = Path(path)
    log = ProblemLog(strict=strict)
    images = _ImageSizes(decode_images)
    report = CheckReport(problems=log.problems)
    if not p.exists():
        log.add(str(p), None, None, "no such file or folder")
        return report
    if p.is_file():
        kind = _classify(p)
        if kind == "world":
            check_world(p.parent, log, images, report.files)
        elif kind == "regions":
            report.files.append(check_regions(str(p), log, images))
        elif kind == "conversations":
            report.files.append(check_conversations(str(p), log, images))
        else:
            log.add(str(p), None, None, "not a region JSONL, a conversation JSON or a world.json")
    else:
        _check_folder(p, log, images, report.files)
        if not report.files and not log.problems:
            log.add(str(p), None, None, "no region JSONL, conversation JSON or world.json found")
    report.images_checked = sum(1 for v in images.cache.values() if not isinstance(v, str))
    return report


def _check_folder(folder: Path, log: ProblemLog, images: _ImageSizes, reports: list[FileReport]) -> None:
    if (folder / "world.json").is_file():
        check_world(folder, log, images, reports)
        return
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in _SKIP_DIRS:
                _check_folder(entry, log, images, reports)
            continue
        kind = _classify(entry)
        if kind == "regions":
            reports.append(check_regions(str(entry), log, images))
        elif kind == "conversations":
            reports.append(check_conversations(str(entry), log, images))
