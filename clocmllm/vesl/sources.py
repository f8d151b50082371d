"""Where the labeller's images come from: a folder, a JSONL list, or a `datasets` folder on disk.

Every source is an indexable, deterministically ordered sequence of `ImageItem`s, so shard `k`
is always items `[k*S, (k+1)*S)` whichever process or machine computes it. Items are cheap: an
image is decoded only by `ImageItem.open()`, inside the shard that needs it, so an unreadable
image costs one skipped item, not the run.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clocmllm.data.jsonl import iter_json_lines
from clocmllm.data.problems import DataError, Problem, ProblemLog

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass
class ImageItem:
    key: str  # stable name: path relative to the folder, the list's `image` string, or the row index
    path: str | None  # absolute path of the file, or None when the image lives inside a dataset
    caption: str | None = None
    data: bytes | None = None  # encoded image bytes (datasets without files on disk)

    def open(self) -> Image.Image:
        """Decode to RGB; raises (OSError, ValueError, ...) when the image is unreadable."""
        src = io.BytesIO(self.data) if self.data is not None else self.path
        if src is None:
            raise ValueError("item has neither a path nor image bytes")
        with Image.open(src) as img:
            img.load()
            return img.convert("RGB")


class ImageSource(Sequence):
    """An ordered list of items plus a short description (recorded in the output's plan.json)."""

    def __init__(self, items: list[ImageItem], description: str):
        self.items = items
        self.description = description

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def folder_source(folder: str | os.PathLike) -> ImageSource:
    """All image files under `folder` (recursive), sorted by relative path."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--images {folder}: not a folder")
    items = [
        ImageItem(p.relative_to(root).as_posix(), str(p))
        for p in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix())
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return ImageSource(items, f"folder:{root}")


def list_source(path: str | os.PathLike) -> ImageSource:
    """A JSONL list of `{"image": PATH}` or `{"image": PATH, "caption": TEXT}`; relative paths are
    relative to the list's folder. A malformed line is an error naming file:line: field (a list is
    the work plan, so it is better fixed than silently shortened)."""
    path = Path(path)
    root = path.resolve().parent
    items = []
    for lineno, obj in iter_json_lines(path, ProblemLog(strict=True)):
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
            raise DataError(Problem(str(path), lineno, "image", "each line needs a non-empty image path"))
        caption = obj.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise DataError(Problem(str(path), lineno, "caption", "caption must be a string"))
        image = obj["image"]
        items.append(ImageItem(image, str(root / image) if not os.path.isabs(image) else image, caption))
    return ImageSource(items, f"list:{path.resolve()}")


def hf_dataset_source(
    folder: str | os.PathLike, image_column: str = "image", caption_column: str | None = "caption"
) -> ImageSource:
    """A `datasets` dataset saved with `save_to_disk` (a `DatasetDict` must have one split).

    The image column is read undecoded (bytes and/or path) so that a corrupt image is skipped
    by the labeller rather than raising inside `datasets`. Images with a readable file path are
    referenced by that path; the others are written next to the shards by the pipeline.
    """
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"--hf-dataset {folder}: has splits {list(ds)}; save a single split")
        ds = next(iter(ds.values()))
    if image_column not in ds.column_names:
        raise ValueError(f"--hf-dataset {folder}: no column {image_column!r} (columns: {ds.column_names})")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    has_caption = caption_column is not None and caption_column in ds.column_names
    items = []
    for i, row in enumerate(ds):
        cell = row[image_column]
        caption = row[caption_column] if has_caption else None
        data, path = None, None
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
        elif isinstance(cell, str):
            path = cell
        if data is not None and path is not None and os.path.isfile(path):
            data = None  # the file is on disk: reference it rather than copy it
        items.append(ImageItem(str(i), path if data is None else None, caption, data))
    return ImageSource(items, f"hf-dataset:{Path(folder).resolve()}")
