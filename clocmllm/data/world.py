"""The synthetic world: render a region-text dataset with referring and grounding chats.

    DIR/world.json                       seed, sizes, vocabulary, classes, counts, version
    DIR/{train,eval}/images/000000.png   the images
    DIR/{train,eval}/regions.jsonl       region-text records (see `clocmllm.data.regions`)
    DIR/{train,eval}/conversations.json  LLaVA chats (see `clocmllm.data.conversations`)

Every image is drawn from its own generator seeded by `SeedSequence([seed, split, index])`,
so the output is byte-identical for a seed whatever the number of worker processes, and the
train and eval streams never share an image seed. world.json is written last and holds no
timings, so a finished folder is recognisable and two runs compare equal file by file.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clocmllm.data import world_vocab as V
from clocmllm.data.atomic import write_bytes_atomic, write_text_atomic
from clocmllm.data.conversations import dumps_conversations
from clocmllm.data.regions import Region, RegionRecord, write_region_jsonl
from clocmllm.data.world_render import draw_object, render_background, to_uint8
from clocmllm.data.world_scene import Scene, sample_scene
from clocmllm.data.world_text import caption, conversations, referring_expressions

SPLITS = {"train": 0, "eval": 1}
PNG_COMPRESS_LEVEL = 1  # fast; small images gain little from harder compression
_POOL_MIN_IMAGES = 64  # below this a pool costs more than it saves


@dataclass
class WorldSample:
    """One generated image with its words, before anything is written."""

    pixels: np.ndarray  # uint8 HxWx3
    record: RegionRecord
    conversations: list[dict]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    bg = scene.background
    img = render_background(
        scene.size, np.asarray(bg.rgb, np.float32), bg.kind, rng, np.asarray(bg.rgb2, np.float32)
    )
    for obj in scene.objects:
        draw_object(img, obj.shape, obj.cx, obj.cy, obj.r, np.asarray(obj.rgb, np.float32))
    return to_uint8(img)


def make_sample(seed: int, split: str, index: int, image_size: int = 64) -> WorldSample:
    """Everything about one image, deterministic in (seed, split, index)."""
    rng = image_rng(seed, split, index)
    scene = sample_scene(rng, image_size)
    pixels = render_scene(scene, rng)
    image = f"images/{index:06d}.png"
    boxes = [[round(c, 2) for c in obj.box] for obj in scene.objects]
    refs = referring_expressions(scene.objects, rng)
    regions = [
        Region(box, obj.phrase, {"shape": obj.shape, "color": obj.color, "size": obj.size, "refs": r})
        for obj, box, r in zip(scene.objects, boxes, refs, strict=True)
    ]
    record = RegionRecord(
        image, caption(scene, rng), regions, image_size, image_size, {"background": scene.background.phrase}
    )
    chats = conversations(scene, boxes, refs, image, f"{split}-{index:06d}", rng)
    return WorldSample(pixels, record, chats)


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _render_and_write(job: tuple[int, str, int, int, str]) -> tuple[RegionRecord, list[dict]]:
    seed, split, index, image_size, split_dir = job
    sample = make_sample(seed, split, index, image_size)
    # Per-image fsync would dominate the run; the folder is only valid once world.json exists.
    write_bytes_atomic(os.path.join(split_dir, sample.record.image), encode_png(sample.pixels), fsync=False)
    return sample.record, sample.conversations


def _prepare_out_dir(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not a world (never delete user data)."""
    if out.exists() and any(out.iterdir()):
        if not (out / "world.json").exists() and not all(
            p.name in SPLITS or p.name.startswith(".") for p in out.iterdir()
        ):
            raise FileExistsError(
                f"{out} is not empty and holds no world.json; choose an empty or new folder"
            )
        (out / "world.json").unlink(missing_ok=True)  # the folder is invalid until rewritten
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def generate_world(
    out_dir: str | os.PathLike,
    train: int,
    eval: int,
    seed: int,
    image_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Render the world into `out_dir`; returns a summary (counts, seconds, images/s)."""
    if train < 0 or eval < 0:
        raise ValueError("train and eval counts must be >= 0")
    if image_size < 24:
        raise ValueError("image_size must be at least 24 pixels (small objects would vanish)")
    out = Path(out_dir)
    _prepare_out_dir(out)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    pool = None
    if workers > 1 and train + eval >= _POOL_MIN_IMAGES:
        # forkserver: safe even when the caller has threads (JAX, torch) running.
        pool = mp.get_context("forkserver").Pool(workers)
    try:
        for split, n in (("train", train), ("eval", eval)):
            split_dir = out / split
            (split_dir / "images").mkdir(parents=True, exist_ok=True)
            jobs = [(seed, split, i, image_size, str(split_dir)) for i in range(n)]
            if pool is not None:
                results = pool.imap(
                    _render_and_write, jobs, chunksize=max(1, min(64, n // (workers * 8) or 1))
                )
            else:
                results = map(_render_and_write, jobs)
            results = _progress(results, n, f"world {split}", progress)
            records, chats = [], []
            for record, convs in results:
                records.append(record)
                chats.extend(convs)
            write_region_jsonl(records, split_dir / "regions.jsonl")
            write_text_atomic(split_dir / "conversations.json", dumps_conversations(chats))
            counts[split] = _split_counts(records, chats)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - start
    meta = {
        "generator": V.GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "splits": {"train": int(train), "eval": int(eval)},
        "vocabulary": {
            "shapes": list(V.SHAPES),
            "colors": {k: list(v) for k, v in V.COLORS.items()},
            "sizes": {k: list(v) for k, v in V.SIZES.items()},
            "backgrounds": {"tones": list(V.BACKGROUND_TONES), "kinds": list(V.BACKGROUND_KINDS)},
        },
        "classes": V.class_names(),
        "counts": counts,
    }
    write_text_atomic(out / "world.json", json.dumps(meta, indent=2) + "\n")
    total = train + eval
    return {
        "out_dir": str(out),
        **meta,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / seconds, 1) if seconds > 0 else None,
        "workers": workers,
    }


def _split_counts(records: list[RegionRecord], chats: list[dict]) -> dict[str, int]:
    return {
        "images": len(records),
        "regions": sum(len(r.regions) for r in records),
        "refs": sum(len(reg.extra.get("refs", [])) for r in records for reg in r.regions),
        "conversations": len(chats),
        "referring": sum(1 for c in chats if c["task"] == "referring"),
        "grounding": sum(1 for c in chats if c["task"] == "grounding"),
    }


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="img", leave=False)


def load_world_meta(out_dir: str | os.PathLike) -> dict:
    with open(Path(out_dir) / "world.json", encoding="utf-8") as f:
        return json.load(f)
