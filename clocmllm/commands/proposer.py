"""`clocmllm proposer --tower DIR --data REGIONS.jsonl --out DIR`: train the box proposer of
proposal grounding (`clocmllm.mllm.proposer`) on a frozen exported tower."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tower", required=True, help="exported CLOC folder or HF CLIP vision folder")
    parser.add_argument(
        "--data", required=True, help="region JSONL with every object's box (e.g. W/train/regions.jsonl)"
    )
    parser.add_argument("--eval-data", default=None, help="region JSONL to report recall@0.5 on")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--k", type=int, default=8, help="proposals per image (candidate tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    from clocmllm.mllm.proposer_train import train_proposer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = train_proposer(
        args.tower,
        args.data,
        args.out,
        eval_data=args.eval_data,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        k=args.k,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(json.dumps(report, sort_keys=True))
    print(f"saved proposer to {args.out}")
    return 0
