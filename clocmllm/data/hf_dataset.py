"""Region-text records as a Hugging Face `datasets.Dataset` (datasets is imported lazily).

Columns: `image` (path; or decoded PIL images with `decode_images=True`, through
`datasets.Image`), `width`, `height`, `caption`, `boxes` (list of [x1, y1, x2, y2] pixels),
`texts` (one per box) and `region_extra` (one JSON string per box: the free-form extra keys
such as the world's shape/color/size/refs, which have no fixed schema across sources).
Flat lists rather than a list of structs keep batched `map` code simple.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from clocmllm.data.problems import ProblemLog
from clocmllm.data.regions import RegionRecord, iter_region_jsonl


def record_row(rec: RegionRecord) -> dict:
    return {
        "image": rec.image_path,
        "width": rec.width,
        "height": rec.height,
        "caption": rec.caption,
        "boxes": [[float(c) for c in r.box] for r in rec.regions],
        "texts": [r.text for r in rec.regions],
        "region_extra": [json.dumps(r.extra, sort_keys=True) for r in rec.regions],
    }


def to_hf_dataset(records: Iterable[RegionRecord], decode_images: bool = False):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image() if decode_images else datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "caption": datasets.Value("string"),
            "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
            "texts": datasets.Sequence(datasets.Value("string")),
            "region_extra": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_list([record_row(r) for r in records], features=features)


def load_region_dataset(
    path: str | os.PathLike, problems: ProblemLog | None = None, decode_images: bool = False
):
    """A region JSONL, or a folder holding `regions.jsonl` (e.g. a world split), as a Dataset."""
    p = Path(path)
    if p.is_dir():
        p = p / "regions.jsonl"
    problems = problems if problems is not None else ProblemLog()
    ds = to_hf_dataset(iter_region_jsonl(p, problems), decode_images=decode_images)
    problems.log_summary(str(p))
    return ds
