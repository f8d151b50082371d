"""Interleaved image-text documents (MMC4/OBELICS-like JSONL) for LCL pretraining.

One JSON object per line, the document's segments in reading order:

    {"segments": [{"text": "A cat sat on"}, {"image": "images/cat.png"}, {"text": "a mat."}]}

A segment holds exactly one of `text` (non-empty string) or `image` (path relative to
the JSONL file's folder, or absolute). Extra top-level keys are kept in `extra`. A bad
line is skipped and counted in a `ProblemLog` (or raises `DataError` when strict) naming
file:line: field, as every reader in clocmllm does.

Paired data (a caption per image) becomes interleaved with `paired_to_interleaved`: the
image goes before or after its caption at random (seeded), as LCL does (Yang et al.,
NeurIPS 2024), so the model sees both captioning (image first) and text-conditioned image
prediction (text first).

numpy/PIL only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from clocmllm.data.atomic import write_jsonl_atomic
from clocmllm.data.jsonl import iter_json_lines
from clocmllm.data.problems import ProblemLog


@dataclass(frozen=True)
class Segment:
    """Either text or an image path (exactly one is set)."""

    text: str | None = None
    image: str | None = None

    @property
    def is_image(self) -> bool:
        return self.image is not None

    def to_json(self) -> dict:
        return {"image": self.image} if self.is_image else {"text": self.text}


@dataclass
class InterleavedDoc:
    segments: list[Segment]
    extra: dict = field(default_factory=dict)
    root: str | None = None  # folder image paths are relative to; not serialised

    def image_path(self, segment: Segment) -> str:
        path = segment.image or ""
        if self.root is None or os.path.isabs(path):
            return path
        return os.path.join(self.root, path)

    @property
    def num_images(self) -> int:
        return sum(s.is_image for s in self.segments)

    def to_json(self) -> dict:
        return {"segments": [s.to_json() for s in self.segments], **self.extra}


def doc_from_json(
    obj: object, file: str, line: int, problems: ProblemLog, root: str | None
) -> InterleavedDoc | None:
    """Validate one decoded line; None (and a logged problem) if bad."""
    if not isinstance(obj, dict):
        problems.add(file, line, None, "a document must be a JSON object")
        return None
    raw = obj.get("segments")
    if not isinstance(raw, list) or not raw:
        problems.add(file, line, "segments", "segments must be a non-empty list")
        return None
    segments = []
    for i, seg in enumerate(raw):
        where = f"segments[{i}]"
        if not isinstance(seg, dict):
            problems.add(file, line, where, "a segment must be an object with 'text' or 'image'")
            return None
        has_text, has_image = "text" in seg, "image" in seg
        if has_text == has_image:
            problems.add(file, line, where, "a segment needs exactly one of 'text' or 'image'")
            return None
        key = "text" if has_text else "image"
        value = seg[key]
        if not isinstance(value, str) or not value.strip():
            problems.add(file, line, f"{where}.{key}", f"{key} must be a non-empty string")
            return None
        segments.append(Segment(text=value) if has_text else Segment(image=value))
    extra = {k: v for k, v in obj.items() if k != "segments"}
    return InterleavedDoc(segments, extra, root)


def iter_interleaved_jsonl(
    path: str | os.PathLike, problems: ProblemLog | None = None
) -> Iterator[InterleavedDoc]:
    """Valid documents of a JSONL file; bad lines go to `problems` (raise if strict).

    Images are not decoded here; the batch builder reports undecodable images.
    """
    problems = problems if problems is not None else ProblemLog()
    path = str(path)
    root = os.path.dirname(os.path.abspath(path))
    for lineno, obj in iter_json_lines(path, problems):
        doc = doc_from_json(obj, path, lineno, problems, root)
        if doc is not None:
            yield doc


def read_interleaved_jsonl(
    path: str | os.PathLike, problems: ProblemLog | None = None
) -> list[InterleavedDoc]:
    return list(iter_interleaved_jsonl(path, problems))


def write_interleaved_jsonl(docs: Iterable[InterleavedDoc], path: str | os.PathLike) -> int:
    """Write documents atomically (temp file, then rename). Returns the count written."""
    return write_jsonl_atomic(path, (doc.to_json() for doc in docs))


def paired_to_interleaved(
    pairs: Iterable[tuple[str, str]], seed: int, root: str | None = None, image_first_p: float = 0.5
) -> list[InterleavedDoc]:
    """(image path, caption) pairs -> one two-segment document each, image first with prob p.

    Pair i's order is drawn from default_rng([seed, i]), so it does not depend on how many
    pairs came before in another run's order of iteration. Use with RegionRecords as
    `paired_to_interleaved(((r.image, r.caption) for r in records), seed, root)`.
    """
    docs = []
    for i, (image, caption) in enumerate(pairs):
        img, txt = Segment(image=image), Segment(text=caption)
        first = np.random.default_rng([seed, i]).random() < image_first_p
        docs.append(InterleavedDoc([img, txt] if first else [txt, img], {}, root))
    return docs


def is_interleaved_jsonl(path: str | os.PathLike) -> bool:
    """Whether a JSONL file holds interleaved documents (its first record has `segments`)."""
    with open(path, encoding="utf-8") as f:
        for text in f:
            if text.strip():
                try:
                    return isinstance(obj := json.loads(text), dict) and "segments" in obj
                except json.JSONDecodeError:
                    return False
    return False


def interleaved_to_pairs(docs: Iterable[InterleavedDoc]) -> list[tuple[str, str]]:
    """(image path, caption) pairs from documents, for the paired recipes (clip, cloc, rocket).

    Our choice (MMC4 assigns images to sentences by similarity; we have no model here): an
    image takes the text segment that follows it, else the one before it; an image with no
    text neighbour is dropped. Absolute or root-relative paths are returned as `image_path`
    resolves them.
    """
    pairs = []
    for doc in docs:
        segs = doc.segments
        for i, seg in enumerate(segs):
            if not seg.is_image:
                continue
            after = next((s.text for s in segs[i + 1 : i + 2] if not s.is_image), None)
            before = next((s.text for s in segs[max(0, i - 1) : i] if not s.is_image), None)
            text = after or before
            if text:
                pairs.append((doc.image_path(seg), text))
    return pairs
