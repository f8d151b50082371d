"""Which object attributes an exported tower's patch tokens carry, by a linear (ridge) probe.

Command (after `clocmllm demo --workdir DIR`; ~20 s a tower on 2 CPU cores):
    .venv/bin/python scripts/probe_tower_attributes.py --world DIR/world \
        --tower DIR/export_clip --tower DIR/export_cloc [--train-images 1500] [--layer -1]
Expected (docs/demo.md, "Grounding, second pass"): on the demo's tiny towers colour is
linearly readable (~0.95+) but shape barely (~0.2, chance 1/7): the reason neither the region
retrieval nor the MLLM's grounding can use shape.

Features: the tower's hidden state `--layer` (the MLLM's `tower.layer`) at the patch under
each object's box centre, read through `VisionTower` exactly as the MLLM reads it. Probe:
one-vs-rest ridge regression on standardised features (closed form, numpy), fitted on the
train split's objects and scored on the eval split's: accuracy per attribute beside chance
(the share of the most frequent class in eval).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ATTRIBUTES = ("color", "shape", "size")


def features(tower, split: Path, limit: int | None) -> tuple[np.ndarray, dict[str, list[str]]]:
    import torch
    from PIL import Image

    from clocmllm.data.regions import read_region_jsonl

    records = read_region_jsonl(split / "regions.jsonl")[:limit]
    feats, labels = [], {a: [] for a in ATTRIBUTES}
    with torch.no_grad():
        for i in range(0, len(records), 64):
            batch = records[i : i + 64]
            loaded = [tower.preprocess(Image.open(split / r.image_path).convert("RGB")) for r in batch]
            pix, geoms = [p for p, _ in loaded], [g for _, g in loaded]
            selected, _ = tower(torch.stack(pix))
            patches = selected[:, -tower.grid * tower.grid :].numpy()
            for b, (rec, geom) in enumerate(zip(batch, geoms, strict=True)):
                for reg in rec.regions:
                    x1, y1, x2, y2 = geom.to_unit(reg.box)
                    col = min(int((x1 + x2) / 2 * tower.grid), tower.grid - 1)
                    row = min(int((y1 + y2) / 2 * tower.grid), tower.grid - 1)
                    feats.append(patches[b, row * tower.grid + col])
                    for a in ATTRIBUTES:
                        labels[a].append(reg.extra[a])
    return np.stack(feats), labels


def ridge_accuracy(xtr, ytr, xev, yev, alpha: float = 1.0) -> float:
    classes = sorted(set(ytr))
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xev - mu) / sd
    a, b = np.hstack([a, np.ones((len(a), 1))]), np.hstack([b, np.ones((len(b), 1))])
    onehot = (np.asarray(ytr)[:, None] == np.asarray(classes)[None]).astype(np.float64)
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ onehot)
    pred = np.asarray(classes)[(b @ w).argmax(1)]
    return float(np.mean(pred == np.asarray(yev)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, required=True, help="a world folder with train/ and eval/")
    ap.add_argument("--tower", type=Path, action="append", required=True, help="exported tower folder(s)")
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--train-images", type=int, default=1500)
    ap.add_argument("--json", type=Path, help="write the table as JSON too")
    args = ap.parse_args()

    import torch

    from clocmllm.mllm.tower import TowerConfig, VisionTower

    torch.set_num_threads(1)
    out = {}
    print(f"{'tower':<40} {'attribute':<8} {'probe acc':>9} {'chance':>7}")
    for folder in args.tower:
        tower = VisionTower(TowerConfig(str(folder), layer=args.layer, region="roi_align")).eval()
        xtr, ytr = features(tower, args.world / "train", args.train_images)
        xev, yev = features(tower, args.world / "eval", None)
        out[str(folder)] = {}
        for a in ATTRIBUTES:
            acc = ridge_accuracy(xtr, ytr[a], xev, yev[a])
            chance = max(yev[a].count(c) for c in set(yev[a])) / len(yev[a])
            out[str(folder)][a] = {"acc": acc, "chance": chance}
            print(f"{str(folder)[-40:]:<40} {a:<8} {acc:>9.3f} {chance:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
