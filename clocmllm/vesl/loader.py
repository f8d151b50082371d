"""The labeller's producer: all per-image work that needs no model, done ahead in one thread.

For each batch, in input order and straight across shard boundaries (the next shard's first batch is
prepared while the model runs on this shard's last one): decode the images, look up the captions that
were given, extract their noun phrases, name each image for its record (writing a PNG for dataset
images that have no file) and let the detector prepare its inputs (pixels and query tokens). The main
thread is left with the model calls, box post-processing and shard writing. PIL decoding, torch
preprocessing and the tagger's compiled parts release the GIL, so this overlaps the forward pass.

Choices (ours): one worker thread, `depth` batches ahead (2 by default). One worker keeps the work in
input order and every function sees exactly the inputs sequential processing would give it, so the
output is identical with or without prefetching (`depth=0` runs everything inline, the reference the
tests compare against); memory stays bounded at `depth + 1` prepared batches.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clocmllm.vesl.captioner import CaptionTable
from clocmllm.vesl.sources import ImageItem
from clocmllm.vesl.timing import StageClock


@dataclass(frozen=True)
class BatchJob:
    shard: int
    items: list[ImageItem]
    last: bool  # the shard's last batch: the main thread writes the shard after it


@dataclass
class LoadedBatch:
    """One batch as the main thread receives it. Per item: the decoded image or the decoder's error,
    the given caption (None: unknown), its phrases and its record's image reference (None until the
    caption is known). `inputs` is the detector's prepared batch when every readable image's caption
    was known here; otherwise `pixels` (all readable images, in order) when the detector makes them."""

    job: BatchJob
    images: list[Image.Image | Exception]
    captions: list[str | None]
    phrases: list[list[str] | None]
    refs: list[str | None]
    inputs: object | None = None
    pixels: object | None = None
    clock: StageClock = field(default_factory=StageClock)


class Serialized:
    """A callable that one thread at a time may run: the loader and (for captioned batches) the main
    thread both extract phrases, and a spaCy pipeline is not documented as thread-safe."""

    def __init__(self, fn: Callable):
        self.fn, self._lock = fn, threading.Lock()

    def __call__(self, *args):
        with self._lock:
            return self.fn(*args)


def is_staged(detector) -> bool:
    """Detectors with `prepare`/`forward`/`postprocess` (OwlDetector) let the loader do their
    preprocessing and the pipeline time their model call apart; others just get `detect`."""
    return all(callable(getattr(detector, m, None)) for m in ("prepare", "forward", "postprocess"))


class ImageRefs:
    """How a record names its image: the file's path (relative to OUT when inside it, else absolute),
    or, for dataset images that have no file, a PNG written under OUT/images/shard-k/."""

    def __init__(self, out: Path):
        self.out, self.root = out, out.resolve()

    def __call__(self, k: int, item: ImageItem, img: Image.Image) -> str:
        path = item.path
        if path is None:
            folder = self.out / "images" / f"shard-{k:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{item.key}.png"
            tmp = target.with_name(target.name + ".tmp")
            img.save(tmp, format="PNG")
            os.replace(tmp, target)
            path = str(target)
        path = os.path.abspath(path)
        rel = os.path.relpath(path, self.root)
        return path if rel.startswith("..") else Path(rel).as_posix()


@dataclass
class BatchPreparer:
    """The loader thread's work for one batch (see the module docstring)."""

    table: CaptionTable | None
    extractor: Callable[[str], list[str]]
    detector: object
    refs: ImageRefs
    has_captioner: bool

    def __call__(self, job: BatchJob) -> LoadedBatch:
        clock = StageClock()
        with clock("decode"):
            images: list[Image.Image | Exception] = []
            for item in job.items:
                try:
                    images.append(item.open())
                except Exception as err:  # any decoder error: the image is skipped and listed, never fatal
                    images.append(err)
        n = len(job.items)
        captions: list[str | None] = [None] * n
        phrases: list[list[str] | None] = [None] * n
        refs: list[str | None] = [None] * n
        readable = [i for i in range(n) if not isinstance(images[i], Exception)]
        with clock("caption_lookup"):
            for i in readable:
                item = job.items[i]
                cap = item.caption
                if cap is None and self.table is not None:
                    cap = self.table.get(item.key, item.path)
                captions[i] = cap
        known = [i for i in readable if captions[i] is not None]
        with clock("phrases"):
            for i in known:
                phrases[i] = self.extractor(captions[i])
        with clock("image_ref"):
            for i in known:
                refs[i] = self.refs(job.shard, job.items[i], images[i])
        batch = LoadedBatch(job, images, captions, phrases, refs, clock=clock)
        if is_staged(self.detector):
            with clock("detector_prepare"):
                if len(known) == len(readable) or not self.has_captioner:
                    if known:  # the usual case: captions given, so the batch goes to the model as is
                        batch.inputs = self.detector.prepare(
                            [images[i] for i in known], [phrases[i] for i in known]
                        )
                elif callable(getattr(self.detector, "pixel_values", None)):
                    batch.pixels = self.detector.pixel_values([images[i] for i in readable])
        return batch


def prefetched(
    jobs: list[BatchJob], work: Callable[[BatchJob], LoadedBatch], depth: int = 2
) -> Iterator[LoadedBatch]:
    """`work(job)` for each job, in order, computed up to `depth` jobs ahead in one background thread.
    Closing the generator (or an error in the consumer) cancels what was queued and joins the thread."""
    if depth < 1:
        yield from map(work, jobs)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="vesl-loader")
    ahead: deque[Future] = deque()
    todo = iter(jobs)
    try:
        for job in todo:
            ahead.append(pool.submit(work, job))
            if len(ahead) >= depth:
                break
        while ahead:
            done = ahead.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(pool.submit(work, nxt))
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
