"""VESL end to end: images -> captions -> noun phrases -> OWL boxes -> region-text shards.

`label(...)` is the library entry point behind `clocmllm label`. Each stage is swappable: pass a
captioner (folder, callable or object), a detector (folder or any object with
`detect(images, phrases) -> list[list[Detection]]`) and a phrase extractor (any
`Callable[[str], list[str]]`). See `clocmllm.vesl.shards` for the output layout and why a killed
run never leaves a shard that looks finished.

Threads: a loader thread (`clocmllm.vesl.loader`) decodes, looks up captions, extracts phrases and
prepares the detector's inputs up to `prefetch` batches ahead, across shard boundaries; the main thread
runs the models, post-processes boxes, builds records and writes shards, in input order. Where the
time went is returned per stage and thread (`LabelSummary.stages`, `.loader_stages`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from clocmllm.data.regions import Region, RegionRecord, write_region_jsonl
from clocmllm.vesl.captioner import CaptionTable, captioner_from
from clocmllm.vesl.loader import (
    BatchJob,
    BatchPreparer,
    ImageRefs,
    LoadedBatch,
    Serialized,
    is_staged,
    prefetched,
)
from clocmllm.vesl.shards import ShardPlan, check_plan, is_done, shard_paths, write_json_atomic
from clocmllm.vesl.sources import ImageSource, folder_source, hf_dataset_source, list_source
from clocmllm.vesl.timing import StageClock

log = logging.getLogger("clocmllm.vesl")


class Detector(Protocol):
    def detect(self, images: list[Image.Image], phrases: list[list[str]]) -> list[list]: ...


@dataclass
class LabelSummary:
    """What a `label()` call did. `seconds` is the whole call (setup and model loading included);
    `model_seconds` the time inside captioner and detector model calls (their own `model_seconds`
    counters). `stages` splits the main thread's wall and CPU seconds by stage (they add up to about
    `seconds`); `loader_stages` is the loader thread's work, which ran in parallel with them."""

    out: str
    shards_total: int
    shards_done_now: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)  # already finished by an earlier run
    images: int = 0
    skipped_images: int = 0
    regions: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    loader_stages: dict[str, dict[str, float]] = field(default_factory=dict)


def label(
    out: str | os.PathLike,
    *,
    detector,
    images: str | os.PathLike | None = None,
    list_file: str | os.PathLike | None = None,
    hf_dataset: str | os.PathLike | None = None,
    source: ImageSource | None = None,
    captions: str | os.PathLike | CaptionTable | None = None,
    captioner=None,
    extractor: Callable[[str], list[str]] | None = None,
    shard_size: int = 1000,
    shard_index: int = 0,
    num_shards: int = 1,
    batch_size: int = 8,
    image_size: int = 448,
    threshold: float = 0.1,
    max_phrases: int = 20,
    image_column: str = "image",
    caption_column: str = "caption",
    caption_prompt: str | None = None,
    device: str = "cpu",
    prefetch: int = 2,
    progress: bool = True,
) -> LabelSummary:
    """Label this process's shards of the input; finished shards are skipped (resumable).

    Exactly one input: `images` (folder), `list_file` (JSONL), `hf_dataset` (load_from_disk folder)
    or a ready `source`. Captions come, in order of preference, from the input itself (list/dataset
    `caption`), from `captions` (JSONL file or table), or from `captioner`; an image with none is
    skipped and listed. `detector` is an OWLv2/OWL-ViT folder or a ready detector object;
    `image_size`, `threshold`, `caption_prompt` and `device` apply to stages given as folders.
    `prefetch` is how many batches the loader thread prepares ahead (0: no thread, all inline).
    """
    t_start = time.perf_counter()
    clock = StageClock()
    with clock("setup"):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        source = _source(images, list_file, hf_dataset, source, image_column, caption_column)
        if shard_size < 1 or batch_size < 1 or prefetch < 0:
            raise ValueError("shard_size and batch_size must be at least 1, prefetch at least 0")
        plan = ShardPlan(len(source), shard_size)
        check_plan(out, plan, source.description)
        table = CaptionTable.from_jsonl(captions) if isinstance(captions, (str, os.PathLike)) else captions
        mine = plan.mine(shard_index, num_shards)
        todo = [k for k in mine if not is_done(out, k)]
    summary = LabelSummary(str(out), plan.num_shards, shards_skipped=[k for k in mine if k not in todo])
    if summary.shards_skipped:
        log.info(
            "%d shard(s) already finished, skipping: %s", len(summary.shards_skipped), summary.shards_skipped
        )
    if not todo:
        return summary

    with clock("load_models"):  # models load only when there is work left
        if isinstance(detector, (str, os.PathLike)):
            from clocmllm.vesl.detector import OwlDetector

            detector = OwlDetector(detector, image_size=image_size, threshold=threshold, device=device)
        if isinstance(captioner, (str, os.PathLike)):
            captioner = captioner_from(captioner, prompt=caption_prompt, device=device)
        else:
            captioner = captioner_from(captioner)
        if extractor is None:
            from clocmllm.vesl.phrases import PhraseExtractor

            extractor = PhraseExtractor(max_phrases=max_phrases)
        extractor = Serialized(extractor)

    from tqdm import tqdm

    jobs = []
    for k in todo:
        start, end = plan.bounds(k)
        items = [source[i] for i in range(start, end)]
        for b in range(0, len(items), batch_size):
            jobs.append(BatchJob(k, items[b : b + batch_size], last=b + batch_size >= len(items)))
    refs = ImageRefs(out)
    work = BatchPreparer(table, extractor, detector, refs, has_captioner=captioner is not None)
    loader_clock = StageClock()
    metrics_path = out / f"metrics-{shard_index}-of-{num_shards}.jsonl"
    shard: _Shard | None = None
    model_seconds_at_start = _model_seconds(captioner, detector)  # a detector object may have run before
    batches = prefetched(jobs, work, depth=prefetch)
    try:
        with tqdm(
            total=sum(len(j.items) for j in jobs), unit="img", desc="VESL", disable=not progress
        ) as bar:
            while True:
                with clock("wait_loader"):
                    batch = next(batches, None)
                if batch is None:
                    break
                loader_clock.add(batch.clock)
                k = batch.job.shard
                if shard is None:
                    shard = _Shard(k, plan.bounds(k)[0], _model_seconds(captioner, detector))
                _label_batch(batch, shard, captioner, extractor, detector, refs, clock)
                bar.update(len(batch.job.items))
                if batch.job.last:
                    with clock("write_shard"):
                        stats = shard.finish(out, _model_seconds(captioner, detector))
                        with open(metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps({**stats.line(), "skipped": len(stats["skipped"])}) + "\n")
                    summary.shards_done_now.append(k)
                    summary.images += stats["images"]
                    summary.skipped_images += len(stats["skipped"])
                    summary.regions += stats["regions"]
                    shard = None
    finally:
        batches.close()  # on an error: cancel the loader's queued batches and join its thread
    summary.model_seconds = _model_seconds(captioner, detector) - model_seconds_at_start
    summary.seconds = time.perf_counter() - t_start
    summary.stages = clock.rounded()
    summary.loader_stages = loader_clock.rounded()
    return summary


class _Stats(dict):
    def line(self) -> dict:
        """The metrics-file line: the stats without the long lists."""
        return {k: v for k, v in self.items() if k not in ("phrase_counts", "skipped")}


@dataclass
class _Shard:
    """One shard's records and counters while its batches go by."""

    k: int
    first_item: int
    model_seconds_at_start: float
    t0: float = field(default_factory=time.perf_counter)
    images: int = 0
    records: list[RegionRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    phrase_counts: Counter = field(default_factory=Counter)
    no_phrases: int = 0

    def skip(self, key: str, reason: str) -> None:
        self.skipped.append({"image": key, "reason": reason})
        log.warning("shard %05d: skipping %s (%s)", self.k, key, reason)

    def finish(self, out: Path, model_seconds_now: float) -> _Stats:
        """Write the records, then the stats (the done marker, last)."""
        records_path, stats_path = shard_paths(out, self.k)
        write_region_jsonl(self.records, records_path)
        n_regions = sum(len(r.regions) for r in self.records)
        stats = _Stats(
            shard=self.k,
            first_item=self.first_item,
            images=self.images,
            labelled=len(self.records),
            skipped=self.skipped,
            images_without_phrases=self.no_phrases,
            regions=n_regions,
            regions_per_image=round(n_regions / len(self.records), 3) if self.records else 0.0,
            phrase_counts=dict(self.phrase_counts.most_common()),
            seconds=round(time.perf_counter() - self.t0, 3),
            model_seconds=round(model_seconds_now - self.model_seconds_at_start, 3),
        )
        write_json_atomic(stats_path, stats)  # last: its presence marks the shard finished
        return stats


def _label_batch(
    batch: LoadedBatch, shard: _Shard, captioner, extractor, detector, refs: ImageRefs, clock: StageClock
) -> None:
    """The main thread's part of one batch: captioner (if needed), detector, records."""
    items = batch.job.items
    shard.images += len(items)
    caps, phrases, img_refs = list(batch.captions), list(batch.phrases), list(batch.refs)
    readable = []
    for i, img in enumerate(batch.images):
        if isinstance(img, Exception):
            shard.skip(items[i].key, f"unreadable image: {type(img).__name__}: {img}")
        else:
            readable.append(i)
    need = [i for i in readable if caps[i] is None]
    if need and captioner is not None:
        with clock("captioner"):
            made = captioner([batch.images[i] for i in need])
        with clock("phrases"):
            for i, cap in zip(need, made, strict=True):
                caps[i], phrases[i] = cap, extractor(cap) if cap is not None else None
        with clock("image_ref"):
            for i in need:
                if caps[i] is not None:
                    img_refs[i] = refs(shard.k, items[i], batch.images[i])
    kept = []
    for i in readable:
        if caps[i] is None:
            shard.skip(items[i].key, "no caption (none given and no captioner)")
        else:
            kept.append(i)
    kept_images = [batch.images[i] for i in kept]
    kept_phrases = [phrases[i] for i in kept]
    if not kept:
        detections = []
    elif is_staged(detector):
        inputs = batch.inputs
        if inputs is None:
            with clock("detector_prepare"):
                pixels = batch.pixels  # made by the loader for every readable image
                if pixels is not None and len(kept) < len(readable):
                    pixels = pixels[[readable.index(i) for i in kept]]
                inputs = detector.prepare(kept_images, kept_phrases, pixels)
        with clock("detector_model"):
            raw = detector.forward(inputs) if inputs.rows else None
        with clock("detector_postprocess"):
            detections = detector.postprocess(inputs, *raw) if raw is not None else [[] for _ in kept]
    else:
        with clock("detector"):
            detections = detector.detect(kept_images, kept_phrases)
    with clock("records"):
        for i, dets in zip(kept, detections, strict=True):
            img = batch.images[i]
            regions = [Region(list(d.box), d.phrase, {"score": d.score}) for d in dets]
            shard.phrase_counts.update(d.phrase for d in dets)
            shard.no_phrases += not phrases[i]
            width, height = img.size
            shard.records.append(
                RegionRecord(img_refs[i], caps[i], regions, width, height, {"phrases": phrases[i]})
            )


def _source(images, list_file, hf_dataset, source, image_column, caption_column) -> ImageSource:
    given = [x for x in (images, list_file, hf_dataset, source) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one input: images (folder), list_file, hf_dataset or source")
    if source is not None:
        return source
    if images is not None:
        return folder_source(images)
    if list_file is not None:
        return list_source(list_file)
    return hf_dataset_source(hf_dataset, image_column, caption_column)


def _model_seconds(*stages) -> float:
    return sum(getattr(s, "model_seconds", 0.0) for s in stages if s is not None)
