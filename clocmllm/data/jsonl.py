"""Line-by-line JSON reading shared by every JSONL reader: bad lines are counted, not fatal."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

from clocmllm.data.problems import ProblemLog


def reject_constant(name: str) -> float:
    """json accepts NaN/Infinity literals by default; a NaN box must be reported, not parsed."""
    if name in ("NaN", "Infinity", "-Infinity"):
        return math.nan
    raise ValueError(name)


def iter_json_lines(path: str | os.PathLike, problems: ProblemLog) -> Iterator[tuple[int, object]]:
    """(1-based line number, decoded object) for each non-blank line; a line that is not JSON
    goes to `problems` (which raises in strict mode) and is skipped."""
    path = str(path)
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            problems.seen += 1
            try:
                yield lineno, json.loads(text, parse_constant=reject_constant)
            except (json.JSONDecodeError, ValueError) as err:
                problems.add(path, lineno, None, f"bad JSON line: {err}")
