"""GRIT (Kosmos-2's GRIT-20M) annotations -> region-text records.

The format assumed (from the Kosmos-2 release and the `zzliang/GRIT` dataset card; the
parquet shards and img2dataset's per-sample JSON carry the same columns):

    {"key": "000373938", "url": "https://...", "caption": "a wire hanger with a paper cover",
     "width": 1024, "height": 693,
     "noun_chunks": [[19, 32, 0.0083, 0.0752, 0.9863, 0.9233, 0.3213], ...],
     "ref_exps":    [[0, 32, 0.0010, 0.0, 1.0, 0.9429, 0.4268], ...]}

Each span is `[char_start, char_end, x1, y1, x2, y2, score]`: the phrase is
`caption[char_start:char_end]` and the box corners are normalised to [0, 1] by the image's
width and height (we multiply back to pixels, so width/height are required). The image file
is found through `image_template` (default `{key}.jpg`; `{shard}` is the first 5 characters
of the key, the sub-folder img2dataset writes; `{id}` is also available), relative to
`image_root`. An explicit "image" field wins over the template.
Which spans become regions is a choice: `spans="ref_exps"` (default: referring expressions,
the longer phrases), "noun_chunks", or "both" (duplicates by text and box are dropped).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

from clocmllm.data.problems import ProblemLog
from clocmllm.data.regions import Region, RegionRecord

SPAN_KEYS = {"ref_exps": ("ref_exps",), "noun_chunks": ("noun_chunks",), "both": ("ref_exps", "noun_chunks")}
_EPS = 1e-3  # normalised coordinates may overshoot [0, 1] by float noise; clipped, not reported


def grit_record(
    obj: object,
    file: str,
    line: int | None,
    problems: ProblemLog,
    image_root: str | None = None,
    image_template: str = "{key}.jpg",
    spans: str = "ref_exps",
    min_score: float = 0.0,
) -> RegionRecord | None:
    """One GRIT sample -> RegionRecord; every problem of the sample is logged, then None."""
    before = len(problems.problems)

    def bad(field_name: str | None, reason: str) -> None:
        problems.add(file, line, field_name, reason)

    if not isinstance(obj, dict):
        bad(None, "a GRIT sample must be a JSON object")
        return None
    caption = obj.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        bad("caption", "missing or empty caption")
        return None
    width, height = obj.get("width"), obj.get("height")
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(
                name,
                f"{name} must be a positive integer (needed to turn normalised boxes into pixels), got {v!r}",
            )
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        key = obj.get("key")
        if not isinstance(key, str) or not key:
            bad("key", "no image path: neither 'image' nor 'key' is set")
        else:
            image = image_template.format(key=key, shard=key[:5], id=obj.get("id"))
    if len(problems.problems) > before:
        return None
    regions: list[Region] = []
    seen: set[tuple] = set()
    for span_key in SPAN_KEYS[spans]:
        raw = obj.get(span_key, [])
        if not isinstance(raw, list):
            bad(span_key, f"{span_key} must be a list of [start, end, x1, y1, x2, y2, score]")
            continue
        for i, span in enumerate(raw):
            where = f"{span_key}[{i}]"
            if (
                not isinstance(span, (list, tuple))
                or len(span) not in (6, 7)
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in span)
            ):
                bad(where, "a span must be [char_start, char_end, x1, y1, x2, y2, score] numbers")
                continue
            start, end, *coords = span[:6]
            score = float(span[6]) if len(span) == 7 else None
            if any(math.isnan(c) or math.isinf(c) for c in span):
                bad(where, "span has NaN or infinite numbers")
                continue
            if not (0 <= start < end <= len(caption)) or start != int(start) or end != int(end):
                bad(where, f"character span [{start}, {end}) is outside the caption (length {len(caption)})")
                continue
            if min(coords) < -_EPS or max(coords) > 1 + _EPS:
                bad(where, f"box {coords} is not normalised to [0, 1]")
                continue
            x1, y1, x2, y2 = (min(1.0, max(0.0, float(c))) for c in coords)
            if x2 <= x1 or y2 <= y1:
                bad(where, f"box has x2<=x1 or y2<=y1: {coords}")
                continue
            text = caption[int(start) : int(end)].strip()
            if not text:
                bad(where, "the span's text is empty")
                continue
            if score is not None and score < min_score:
                continue
            box = [x1 * width, y1 * height, x2 * width, y2 * height]
            ident = (text, *(round(c, 3) for c in box))
            if ident in seen:
                continue
            seen.add(ident)
            extra = {"source": span_key}
            if score is not None:
                extra["score"] = score
            regions.append(Region(box, text, extra))
    if len(problems.problems) > before:
        return None
    extra = {k: obj[k] for k in ("key", "url", "id") if k in obj}
    return RegionRecord(image, caption, regions, width, height, extra, image_root)


def iter_grit(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    problems: ProblemLog | None = None,
    image_template: str = "{key}.jpg",
    spans: str = "ref_exps",
    min_score: float = 0.0,
) -> Iterator[RegionRecord]:
    """Records of a GRIT JSONL (one sample a line) or parquet shard (pyarrow, read lazily)."""
    if spans not in SPAN_KEYS:
        raise ValueError(f"spans must be one of {sorted(SPAN_KEYS)}, got {spans!r}")
    problems = problems if problems is not None else ProblemLog()
    path = str(path)
    root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    for line, obj in _rows(path, problems):
        problems.seen += 1
        rec = grit_record(obj, path, line, problems, root, image_template, spans, min_score)
        if rec is not None:
            yield rec


def read_grit(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, **kwargs
) -> list[RegionRecord]:
    return list(iter_grit(path, image_root, **kwargs))


def _rows(path: str, problems: ProblemLog) -> Iterator[tuple[int, object]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for obj in batch.to_pylist():
                row += 1
                yield row, obj  # "line" = 1-based row number of the shard
        return
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as err:
                problems.seen += 1
                problems.add(path, lineno, None, f"bad JSON line: {err}")
                continue
            yield lineno, obj
