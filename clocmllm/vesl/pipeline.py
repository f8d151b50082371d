"""VESL end to end: images -> captions -> noun phrases -> OWL boxes -> region-text shards.

`label(...)` is the library entry point behind `clocmllm label`. Each stage is swappable: pass a
captioner (folder, callable or object), a detector (folder or any object with
`detect(images, phrases) -> list[list[Detection]]`) and a phrase extractor (any
`Callable[[str], list[str]]`). See `clocmllm.vesl.shards` for the output layout and why a killed
run never leaves a shard that looks finished.

Decoding the next batch's images runs in a background thread while the models run on the current
one (PIL and torch release the GIL), so pipeline overhead stays small next to model time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from clocmllm.data.regions import Region, RegionRecord, write_region_jsonl
from clocmllm.vesl.captioner import CaptionTable, captioner_from
from clocmllm.vesl.shards import ShardPlan, check_plan, is_done, shard_paths, write_json_atomic
from clocmllm.vesl.sources import ImageItem, ImageSource, folder_source, hf_dataset_source, list_source

log = logging.getLogger("clocmllm.vesl")


class Detector(Protocol):
    def detect(self, images: list[Image.Image], phrases: list[list[str]]) -> list[list]: ...


@dataclass
class LabelSummary:
    out: str
    shards_total: int
    shards_done_now: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)  # already finished by an earlier run
    images: int = 0
    skipped_images: int = 0
    regions: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0


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
    progress: bool = True,
) -> LabelSummary:
    """Label this process's shards of the input; finished shards are skipped (resumable).

    Exactly one input: `images` (folder), `list_file` (JSONL), `hf_dataset` (load_from_disk folder)
    or a ready `source`. Captions come, in order of preference, from the input itself (list/dataset
    `caption`), from `captions` (JSONL file or table), or from `captioner`; an image with none is
    skipped and listed. `detector` is an OWLv2/OWL-ViT folder or a ready detector object;
    `image_size`, `threshold`, `caption_prompt` and `device` apply to stages given as folders.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = _source(images, list_file, hf_dataset, source, image_column, caption_column)
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be at least 1")
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

    # Models load only when there is work left.
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

    from tqdm import tqdm

    n_items = sum(plan.bounds(k)[1] - plan.bounds(k)[0] for k in todo)
    metrics_path = out / f"metrics-{shard_index}-of-{num_shards}.jsonl"
    with (
        tqdm(total=n_items, unit="img", desc="VESL", disable=not progress) as bar,
        ThreadPoolExecutor(1) as pool,
    ):
        for k in todo:
            stats = _label_shard(
                out, k, plan, source, table, captioner, extractor, detector, batch_size, pool, bar
            )
            summary.shards_done_now.append(k)
            summary.images += stats["images"]
            summary.skipped_images += len(stats["skipped"])
            summary.regions += stats["regions"]
            summary.model_seconds += stats["model_seconds"]
            line = {k2: v for k2, v in stats.items() if k2 not in ("phrase_counts", "skipped")}
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({**line, "skipped": len(stats["skipped"])}) + "\n")
    summary.seconds = time.perf_counter() - t_start
    return summary


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


def _load(items: list[ImageItem], detector) -> tuple[list[Image.Image | Exception], object]:
    """Decode a batch (errors returned in place of images) and, when the detector can, prepare its
    pixel tensor for the readable ones; runs in the background thread."""
    out: list[Image.Image | Exception] = []
    for item in items:
        try:
            out.append(item.open())
        except Exception as err:  # any decoder error: the image is skipped and listed, never fatal
            out.append(err)
    good = [im for im in out if not isinstance(im, Exception)]
    prepare = getattr(detector, "pixel_values", None)
    pixels = prepare(good) if prepare is not None and good else None
    return out, pixels


def _model_seconds(*stages) -> float:
    return sum(getattr(s, "model_seconds", 0.0) for s in stages if s is not None)


def _label_shard(out, k, plan, source, table, captioner, extractor, detector, batch_size, pool, bar) -> dict:
    t0 = time.perf_counter()
    m0 = _model_seconds(captioner, detector)
    start, end = plan.bounds(k)
    items = [source[i] for i in range(start, end)]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    records: list[RegionRecord] = []
    skipped: list[dict] = []
    phrase_counts: Counter[str] = Counter()
    no_phrases = 0
    pending = pool.submit(_load, batches[0], detector) if batches else None
    for b, batch in enumerate(batches):
        loaded, pixels = pending.result()
        pending = pool.submit(_load, batches[b + 1], detector) if b + 1 < len(batches) else None
        good: list[tuple[ImageItem, Image.Image]] = []
        for item, img in zip(batch, loaded, strict=True):
            if isinstance(img, Exception):
                reason = f"unreadable image: {type(img).__name__}: {img}"
                skipped.append({"image": item.key, "reason": reason})
                log.warning("shard %05d: skipping %s (%s)", k, item.key, reason)
            else:
                good.append((item, img))
        caps = _captions(good, table, captioner)
        kept, rows = [], []
        for row, ((item, img), cap) in enumerate(zip(good, caps, strict=True)):
            if cap is None:
                skipped.append({"image": item.key, "reason": "no caption (none given and no captioner)"})
                log.warning("shard %05d: skipping %s (no caption)", k, item.key)
            else:
                kept.append((item, img, cap))
                rows.append(row)
        phrases = [extractor(cap) for _, _, cap in kept]
        kept_images = [img for _, img, _ in kept]
        if not kept:
            detections = []
        elif pixels is not None:
            detections = detector.detect(kept_images, phrases, pixels=pixels[rows])
        else:
            detections = detector.detect(kept_images, phrases)
        for (item, img, cap), phr, dets in zip(kept, phrases, detections, strict=True):
            ref = _image_ref(out, k, item, img)
            regions = [Region(list(d.box), d.phrase, {"score": d.score}) for d in dets]
            phrase_counts.update(d.phrase for d in dets)
            no_phrases += not phr
            width, height = img.size
            records.append(RegionRecord(ref, cap, regions, width, height, {"phrases": phr}))
        bar.update(len(batch))
    records_path, stats_path = shard_paths(out, k)
    write_region_jsonl(records, records_path)
    n_regions = sum(len(r.regions) for r in records)
    stats = {
        "shard": k,
        "first_item": start,
        "images": len(items),
        "labelled": len(records),
        "skipped": skipped,
        "images_without_phrases": no_phrases,
        "regions": n_regions,
        "regions_per_image": round(n_regions / len(records), 3) if records else 0.0,
        "phrase_counts": dict(phrase_counts.most_common()),
        "seconds": round(time.perf_counter() - t0, 3),
        "model_seconds": round(_model_seconds(captioner, detector) - m0, 3),
    }
    write_json_atomic(stats_path, stats)  # last: its presence marks the shard finished
    return stats


def _captions(good, table: CaptionTable | None, captioner) -> list[str | None]:
    caps: list[str | None] = []
    for item, _ in good:
        cap = item.caption
        if cap is None and table is not None:
            cap = table.get(item.key, item.path)
        caps.append(cap)
    need = [i for i, c in enumerate(caps) if c is None]
    if need and captioner is not None:
        made = captioner([good[i][1] for i in need])
        for i, c in zip(need, made, strict=True):
            caps[i] = c
    return caps


def _image_ref(out: Path, k: int, item: ImageItem, img: Image.Image) -> str:
    """How a record names its image: the file's path (relative to OUT when inside it, else absolute),
    or, for dataset images that have no file, a PNG written under OUT/images/shard-k/."""
    path = item.path
    if path is None:
        folder = out / "images" / f"shard-{k:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{item.key}.png"
        tmp = target.with_name(target.name + ".tmp")
        img.save(tmp, format="PNG")
        os.replace(tmp, target)
        path = str(target)
    path = os.path.abspath(path)
    rel = os.path.relpath(path, out.resolve())
    return path if rel.startswith("..") else Path(rel).as_posix()
