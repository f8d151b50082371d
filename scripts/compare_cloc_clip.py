"""CLOC vs CLIP on the synthetic world: same data, model, budget; region retrieval of each.

    python scripts/compare_cloc_clip.py --world W --out runs/compare [--steps N] [--recipes demo]

Trains `scripts/recipes/tiny_clip.yaml` and `tiny_cloc.yaml` on W (a world made by
`clocmllm world --out W --train 2000 --eval 200 --seed 0`), then evaluates both on W's
held-out eval split: the CLIP baseline's regions by RoI-Align, CLOC's by its prompter.
Expected: ~4 min on 2 idle CPU cores at the recipes' 800 steps (~2 x 6 min on busy ones);
region retrieval R@1 0.129 (CLOC) vs 0.015 (CLIP, RoI-Align) (docs/pretraining.md).
Runs in existing workdirs resume (or are reused when finished).
`--recipes demo` compares the demo's pair instead (`demo_clip.yaml`, `demo_cloc.yaml`: 1500
steps; docs/demo.md tuning log runs r9 / r9-clip, on a 4000/300 world).
`--warm-steps N` adds two CLOC runs of N steps each: one from scratch and one started from
the CLIP run's weights (`init_from`, encoder/warm_start.py): what a CLIP checkpoint buys
CLOC at equal CLOC budget (docs/pretraining.md, "Starting from CLIP weights").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clocmllm.encoder.evaluators import evaluate_checkpoint
from clocmllm.encoder.trainer import load_recipe, train

RECIPES = Path(__file__).resolve().parent / "recipes"
KEYS = (
    "image_text_r1",
    "image_text_r5",
    "region_retrieval_r1",
    "region_retrieval_r10",
    "region_cls_acc",
    "zero_shot_acc",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--recipes", choices=("tiny", "demo"), default="tiny", help="which recipe pair")
    ap.add_argument(
        "--warm-steps", type=int, default=0, help="also CLOC for N steps, from scratch and from CLIP"
    )
    args = ap.parse_args()
    out = Path(args.out)
    rows = {}
    runs = [("clip", "clip", {}, args.steps), ("cloc", "cloc", {}, args.steps)]
    if args.warm_steps:
        n = args.warm_steps
        runs += [
            (f"cloc_{n}", "cloc", {}, n),
            (f"clip+cloc_{n}", "cloc", {"init_from": str(out / "clip")}, n),
        ]
    for name, mode, extra, steps in runs:
        cfg = {**load_recipe(RECIPES / f"{args.recipes}_{mode}.yaml"), **extra}
        t0 = time.perf_counter()
        summary = train(cfg, out / name, data=args.world, steps=steps)
        train_s = time.perf_counter() - t0
        metrics = evaluate_checkpoint(out / name, args.world, split="eval")
        rows[name] = {
            # a finished run in an existing workdir is reused: no training time to report
            "train_s": round(train_s, 1) if summary["resumed_from"] < summary["steps"] else "reused",
            "steps": summary["steps"],
            **{k: round(metrics[k], 4) for k in KEYS},
        }
        print(name, json.dumps(rows[name]), flush=True)
    heads = {"clip": "clip(RoI)"}
    print(f"{'metric':24s}" + "".join(f" {heads.get(n, n):>14s}" for n in rows))
    for k in ("train_s", "steps", *KEYS):
        print(f"{k:24s}" + "".join(f" {r[k]:>14}" for r in rows.values()))
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
