"""COCO-style annotations (instances JSON + optional captions JSON) -> region-text records.

    instances: {"images": [{"id", "file_name", "width", "height"}],
                "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h], "iscrowd"}],
                "categories": [{"id", "name"}]}
    captions:  {"annotations": [{"image_id", "caption"}]}

Boxes `[x, y, w, h]` become corners `[x, y, x + w, y + h]`; the region text is the category
name (region classification and retrieval with class names, as CLOC's COCO/LVIS evaluations
do). The record caption is the image's first caption; all of them are kept in `captions`.
Choices: crowd annotations are skipped unless `keep_crowd`; a box that overshoots the image by
at most one pixel (rounding in the original annotations) is clipped, anything more is a problem.
A COCO file is usually one long line, so problems name the JSON path (`annotations[12].bbox`)
instead of a line; one bad annotation skips that region only, not the image.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

from clocmllm.boxes import box_problem
from clocmllm.data.problems import ProblemLog
from clocmllm.data.regions import Region, RegionRecord

_CLIP_TOLERANCE = 1.0


def _load(path: str, problems: ProblemLog) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as err:
        problems.add(path, getattr(err, "lineno", None), None, f"bad JSON: {err}")
        return None
    if not isinstance(obj, dict):
        problems.add(path, None, None, "a COCO file must hold a JSON object")
        return None
    return obj


def read_coco(
    instances: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    problems: ProblemLog | None = None,
    keep_crowd: bool = False,
) -> list[RegionRecord]:
    """Records in the order of `images`; `image_root` defaults to the instances file's folder."""
    problems = problems if problems is not None else ProblemLog()
    inst_path = str(instances)
    root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(inst_path))
    data = _load(inst_path, problems)
    if data is None:
        return []
    categories: dict[int, str] = {}
    for i, cat in enumerate(data.get("categories", [])):
        if not isinstance(cat, dict) or not isinstance(cat.get("name"), str) or not cat["name"].strip():
            problems.add(inst_path, None, f"categories[{i}].name", "missing category name")
            continue
        categories[cat.get("id")] = cat["name"]
    images: dict[int, dict] = {}
    order: list[int] = []
    for i, img in enumerate(data.get("images", [])):
        where = f"images[{i}]"
        if not isinstance(img, dict):
            problems.add(inst_path, None, where, "an image entry must be an object")
            continue
        fname, w, h = img.get("file_name"), img.get("width"), img.get("height")
        if not isinstance(fname, str) or not fname:
            problems.add(inst_path, None, f"{where}.file_name", "missing file_name")
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
            problems.add(
                inst_path, None, f"{where}.width", f"width/height must be positive integers, got {w!r}x{h!r}"
            )
            continue
        images[img.get("id")] = img
        order.append(img.get("id"))

    caps: dict[int, list[str]] = defaultdict(list)
    if captions is not None:
        cap_path = str(captions)
        cap_data = _load(cap_path, problems) or {}
        for i, ann in enumerate(cap_data.get("annotations", [])):
            text = ann.get("caption") if isinstance(ann, dict) else None
            if not isinstance(text, str) or not text.strip():
                problems.add(cap_path, None, f"annotations[{i}].caption", "empty caption")
                continue
            caps[ann.get("image_id")].append(text.strip())

    regions: dict[int, list[Region]] = defaultdict(list)
    for i, ann in enumerate(data.get("annotations", [])):
        problems.seen += 1
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            problems.add(inst_path, None, where, "an annotation must be an object")
            continue
        img = images.get(ann.get("image_id"))
        if img is None:
            problems.add(inst_path, None, f"{where}.image_id", f"unknown image_id {ann.get('image_id')!r}")
            continue
        name = categories.get(ann.get("category_id"))
        if name is None:
            problems.add(
                inst_path, None, f"{where}.category_id", f"unknown category_id {ann.get('category_id')!r}"
            )
            continue
        if ann.get("iscrowd") and not keep_crowd:
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            problems.add(inst_path, None, f"{where}.bbox", "bbox must be [x, y, w, h]")
            continue
        box = _corners(bbox, img["width"], img["height"])
        why = box_problem(box, img["width"], img["height"])
        if why:
            problems.add(inst_path, None, f"{where}.bbox", f"{why} (from [x, y, w, h] = {bbox})")
            continue
        extra = {"category_id": ann.get("category_id"), "annotation_id": ann.get("id")}
        if ann.get("iscrowd"):
            extra["iscrowd"] = 1
        regions[img["id"]].append(Region([float(c) for c in box], name, extra))

    out = []
    for image_id in order:
        img = images[image_id]
        texts = caps.get(image_id, [])
        extra = {"image_id": image_id}
        if len(texts) > 1:
            extra["captions"] = texts
        out.append(
            RegionRecord(
                img["file_name"],
                texts[0] if texts else "",
                regions.get(image_id, []),
                img["width"],
                img["height"],
                extra,
                root,
            )
        )
    return out


def _corners(bbox: list, width: int, height: int) -> list:
    """[x, y, w, h] -> [x1, y1, x2, y2], clipping a sub-pixel overshoot of the image."""
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in bbox):
        return bbox  # box_problem reports it
    x, y, w, h = bbox
    box = [x, y, x + w, y + h]
    if -_CLIP_TOLERANCE <= box[0] < 0:
        box[0] = 0.0
    if -_CLIP_TOLERANCE <= box[1] < 0:
        box[1] = 0.0
    if width < box[2] <= width + _CLIP_TOLERANCE:
        box[2] = float(width)
    if height < box[3] <= height + _CLIP_TOLERANCE:
        box[3] = float(height)
    return box
