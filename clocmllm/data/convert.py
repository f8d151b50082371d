"""GRIT / COCO annotations -> one region-text JSONL (behind `clocmllm data convert`).

Image paths are rewritten relative to the output file's folder, so the JSONL can live apart
from the images and still resolve them (the region format's rule: relative to the JSONL).
"""

from __future__ import annotations

import os
from pathlib import Path

from clocmllm.data.problems import ProblemLog
from clocmllm.data.regions import write_region_jsonl


def convert_to_regions(
    source: str,
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    strict: bool = False,
    captions: str | os.PathLike | None = None,
    keep_crowd: bool = False,
    image_template: str = "{key}.jpg",
    spans: str = "ref_exps",
    min_score: float = 0.0,
) -> ProblemLog:
    """Read `input_path` as `source` ('grit' or 'coco'), write `out` atomically; returns the log."""
    log = ProblemLog(strict=strict)
    if source == "grit":
        from clocmllm.data.grit import iter_grit

        records = iter_grit(
            input_path, image_root, log, image_template=image_template, spans=spans, min_score=min_score
        )
    elif source == "coco":
        from clocmllm.data.coco import read_coco

        records = read_coco(input_path, captions, image_root, log, keep_crowd=keep_crowd)
    else:
        raise ValueError(f"source must be 'grit' or 'coco', got {source!r}")
    out_dir = os.path.dirname(os.path.abspath(out))

    def relocated():
        for rec in records:
            rec.image = os.path.relpath(os.path.abspath(rec.image_path), out_dir)
            rec.root = out_dir
            yield rec

    write_region_jsonl(relocated(), Path(out))
    log.log_summary(str(input_path))
    return log
