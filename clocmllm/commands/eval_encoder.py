"""`clocmllm eval encoder`: zero-shot image-text, region retrieval and region classification
of a JAX encoder checkpoint (thin layer over `clocmllm.encoder.evaluators.evaluate_checkpoint`)."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="a pretrain workdir (latest step) or WORKDIR/checkpoints/STEP"
    )
    parser.add_argument("--data", required=True, help="region JSONL file, shard folder or world folder")
    parser.add_argument("--split", default="eval", help="split folder of a world (default: eval)")
    parser.add_argument("--json", help="write the metrics to this JSON file")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--regions",
        choices=("auto", "prompter", "roi"),
        default="auto",
        help="region features: auto = prompter for cloc checkpoints, RoI-Align for clip ones",
    )
    parser.add_argument("--no-zero-shot", action="store_true", help="skip the region-crop classification")


def run(args: argparse.Namespace) -> int:
    from clocmllm.encoder.evaluators import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        max_images=args.max_images,
        batch_size=args.batch_size,
        region_source=None if args.regions == "auto" else args.regions,
        zero_shot=not args.no_zero_shot,
    )
    text = json.dumps(metrics, indent=2)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, args.json)
    print(text)
    return 0
