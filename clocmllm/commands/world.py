"""`clocmllm world`: render the synthetic region-text world (see `clocmllm.data.world`)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an earlier world)")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--eval", type=int, default=500, help="evaluation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--metrics",
        default=None,
        help="append the run's summary (timings included) as one JSON line to this file; "
        "kept out of the world folder so that stays byte-identical for a seed",
    )


def run(args: argparse.Namespace) -> int:
    from clocmllm.data.world import generate_world

    summary = generate_world(
        args.out,
        args.train,
        args.eval,
        args.seed,
        args.image_size,
        workers=args.workers,
        progress=not args.quiet,
    )
    if args.metrics:
        from pathlib import Path

        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        with open(args.metrics, "a", encoding="utf-8") as f:
            f.write(
                json.dumps({k: v for k, v in summary.items() if k not in ("vocabulary", "classes")}) + "\n"
            )
    counts = summary["counts"]
    for split, c in counts.items():
        print(
            f"{split}: {c['images']} images, {c['regions']} regions, {c['refs']} referring expressions, "
            f"{c['conversations']} conversations -> {summary['out_dir']}/{split}"
        )
    print(
        json.dumps(
            {k: summary[k] for k in ("seed", "image_size", "seconds", "images_per_second", "workers")},
            sort_keys=True,
        )
    )
    return 0
