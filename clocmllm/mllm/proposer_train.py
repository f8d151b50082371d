"""Train a `BoxProposer` on a frozen tower from region-text JSONL (`clocmllm proposer`).

Any region JSONL of the foundation format works (the world's `regions.jsonl`, a VESL output,
a COCO conversion): only the boxes are read, class-agnostic, and every box of an image is an
object. Images with no regions are kept as negatives. The tower is frozen, so its tokens are
computed once and cached in memory when they fit `cache_gb`, else recomputed per batch.

Output folder (written atomically): `proposer.safetensors`, `proposer_config.json` (with the
tower it was trained on), `metrics.jsonl` (a line per `log_every` steps) and
`proposer_report.json` (recall@0.5 of the K proposals on the train and eval splits).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clocmllm.data.atomic import atomic_dir
from clocmllm.data.problems import ProblemLog
from clocmllm.data.regions import read_region_jsonl
from clocmllm.mllm.proposer import (
    BoxProposer,
    ProposerConfig,
    assign_targets,
    last_patches,
    proposal_loss,
    recall_at,
)
from clocmllm.mllm.tower import TowerConfig, VisionTower

log = logging.getLogger("clocmllm.mllm")


class _Images:
    """Image paths and their unit boxes. Only headers are read up front (unreadable images are
    counted out there); pixels are decoded per batch, so memory holds tokens, not images."""

    def __init__(self, path: str | Path, tower: VisionTower, problems: ProblemLog):
        self.tower, self.paths, self.boxes = tower, [], []
        for rec in read_region_jsonl(path, problems):
            try:
                with Image.open(rec.image_path) as im:
                    geom = tower.geometry(*im.size)
            except (OSError, ValueError) as err:
                problems.add(str(path), None, rec.image, f"image: {err}")
                continue
            self.paths.append(rec.image_path)
            units = [geom.to_unit(r.box) for r in rec.regions]
            self.boxes.append(torch.tensor(units, dtype=torch.float32).reshape(-1, 4))
        if not self.paths:
            raise ValueError(f"{path}: no usable images ({problems.summary()})")

    def __len__(self) -> int:
        return len(self.paths)

    def tokens(self, idx: list[int], cache: torch.Tensor | None) -> torch.Tensor:
        if cache is not None:
            return cache[idx]
        pixels = []
        for i in idx:
            with Image.open(self.paths[i]) as im:
                pixels.append(self.tower.preprocess(im)[0])  # the geometry converts to RGB
        return last_patches(self.tower, torch.stack(pixels))

    def all_tokens(self, batch: int = 128, progress: bool = True) -> torch.Tensor:
        from tqdm.auto import tqdm

        out = [
            self.tokens(list(range(i, min(i + batch, len(self)))), None)
            for i in tqdm(range(0, len(self), batch), desc="tower tokens", disable=not progress)
        ]
        return torch.cat(out)


def _recall(proposer: BoxProposer, images: _Images, cache: torch.Tensor | None) -> dict:
    hit = total = 0
    for i in range(0, len(images), 128):
        idx = list(range(i, min(i + 128, len(images))))
        props, _ = proposer.propose(images.tokens(idx, cache))
        h, t = recall_at(props, [images.boxes[j] for j in idx])
        hit, total = hit + h, total + t
    return {"recall50": hit / total if total else None, "objects": total, "images": len(images)}


def train_proposer(
    tower_dir: str | Path,
    data: str | Path,
    out: str | Path,
    eval_data: str | Path | None = None,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 2e-3,
    k: int = 8,
    width: int = 128,
    seed: int = 0,
    log_every: int = 50,
    cache_gb: float = 4.0,
    progress: bool = True,
) -> dict:
    """Train, evaluate and write the proposer folder; returns its report."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tower = VisionTower(TowerConfig(str(tower_dir), layer=-1, region="roi_align")).eval()
    problems = ProblemLog()
    train = _Images(data, tower, problems)
    n_tok = tower.grid * tower.grid * tower.hidden_size
    fits = len(train) * n_tok * 4 <= cache_gb * 2**30
    cache = train.all_tokens(progress=progress) if fits else None
    proposer = BoxProposer(ProposerConfig(grid=tower.grid, dim=tower.hidden_size, width=width, k=k))
    opt = torch.optim.AdamW(proposer.parameters(), lr=lr, weight_decay=0.01)
    if steps < 1:
        raise ValueError(f"proposer: steps must be >= 1, got {steps}")
    warm = max(1, steps // 20)  # linear warm-up over 5 %, then cosine to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))
        ),
    )
    with atomic_dir(out) as tmp, open(tmp / "metrics.jsonl", "w", encoding="utf-8") as metrics:
        bar = tqdm(range(1, steps + 1), desc="proposer", disable=not progress)
        for step in bar:
            idx = rng.integers(len(train), size=batch_size).tolist()
            obj, tbox = assign_targets([train.boxes[i] for i in idx], tower.grid)
            logits, boxes = proposer(train.tokens(idx, cache))
            loss, parts = proposal_loss(logits, boxes, obj, tbox)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"proposer: loss is {float(loss)} at step {step}; nothing written")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % log_every == 0 or step == steps:
                metrics.write(json.dumps({"step": step, "lr": sched.get_last_lr()[0], **parts}) + "\n")
                bar.set_postfix(loss=f"{parts['loss']:.3f}")
        proposer.eval()
        report = {"train": _recall(proposer, train, cache), "k": k, "steps": steps}
        if eval_data is not None:
            ev = _Images(eval_data, tower, problems)
            report["eval"] = _recall(proposer, ev, ev.all_tokens(progress=False))
        report["skipped"] = problems.summary()
        report["seconds"] = round(time.perf_counter() - t0, 1)
        tower_id = {"tower": str(Path(tower_dir).resolve()), "image_size": tower.image_size}
        proposer.save(tmp, extra=tower_id)
        (tmp / "proposer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if problems.problems:
        log.warning("proposer: %s", problems.summary())
    return report
