"""`clocmllm data check|convert`: validate datasets; turn GRIT or COCO annotations into region JSONL."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="report every problem (file:line: field: reason); exit 1 if any")
    check.add_argument(
        "path", help="a regions .jsonl, a conversations .json, a world folder, or a folder of those"
    )
    check.add_argument("--strict", action="store_true", help="stop at the first problem")
    check.add_argument(
        "--no-images", action="store_true", help="only check that images exist; do not decode them"
    )
    check.add_argument("--max-problems", type=int, default=1000, help="print at most this many problems")

    convert = sub.add_parser("convert", help="GRIT or COCO annotations -> region-text JSONL")
    convert.add_argument("source", choices=("grit", "coco"))
    convert.add_argument("input", help="GRIT .jsonl/.parquet, or COCO instances .json")
    convert.add_argument(
        "--out", required=True, help="output regions .jsonl (image paths made relative to it)"
    )
    convert.add_argument(
        "--image-root", default=None, help="folder the image files are in (default: the input's)"
    )
    convert.add_argument("--captions", default=None, help="COCO captions .json")
    convert.add_argument("--keep-crowd", action="store_true", help="COCO: keep iscrowd annotations")
    convert.add_argument(
        "--image-template", default="{key}.jpg", help="GRIT: image file from {key}, {shard}, {id}"
    )
    convert.add_argument("--spans", default="ref_exps", choices=("ref_exps", "noun_chunks", "both"))
    convert.add_argument("--min-score", type=float, default=0.0, help="GRIT: drop spans below this score")
    convert.add_argument("--strict", action="store_true", help="stop at the first bad sample")


def run(args: argparse.Namespace) -> int:
    from clocmllm.data.problems import DataError

    try:
        return _check(args) if args.action == "check" else _convert(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    from clocmllm.data.check import check_dataset

    report = check_dataset(args.path, decode_images=not args.no_images, strict=args.strict)
    for problem in report.problems[: args.max_problems]:
        print(problem)
    if len(report.problems) > args.max_problems:
        print(f"... and {len(report.problems) - args.max_problems} more")
    print(report.summary())
    return 0 if report.ok else 1


def _convert(args: argparse.Namespace) -> int:
    from clocmllm.data.convert import convert_to_regions

    log = convert_to_regions(
        args.source,
        args.input,
        args.out,
        image_root=args.image_root,
        strict=args.strict,
        captions=args.captions,
        keep_crowd=args.keep_crowd,
        image_template=args.image_template,
        spans=args.spans,
        min_score=args.min_score,
    )
    print(f"{args.out}: {log.summary()}")
    return 0
