"""`clocmllm label`: VESL region-text labels for images (a thin layer over clocmllm.vesl.pipeline.label)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (recursive, sorted)")
    src.add_argument("--list", dest="list_file", metavar="FILE", help="JSONL of {image} or {image, caption}")
    src.add_argument("--hf-dataset", metavar="DIR", help="a datasets folder saved with save_to_disk")
    cap = parser.add_mutually_exclusive_group()
    cap.add_argument("--captions", metavar="FILE", help="JSONL of {image, caption}: use these captions")
    cap.add_argument("--captioner", metavar="DIR", help="local Hugging Face image-to-text model folder")
    parser.add_argument(
        "--caption-prompt", default=None, help="text prompt for the captioner (e.g. a task token)"
    )
    parser.add_argument("--detector", required=True, metavar="OWLV2_DIR", help="local OWLv2 / OWL-ViT folder")
    parser.add_argument("--out", required=True, metavar="SHARDS", help="output folder of shard-*.jsonl")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--shard-index", type=int, default=0, help="this process's index (default 0)")
    parser.add_argument("--num-shards", type=int, default=1, help="number of processes sharing the work")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    parser.add_argument("--image-size", type=int, default=448, help="detector input size (default 448)")
    parser.add_argument("--threshold", type=float, default=0.1, help="box score threshold (default 0.1)")
    parser.add_argument("--max-phrases", type=int, default=20, help="phrases kept per caption (default 20)")
    parser.add_argument("--image-column", default="image", help="--hf-dataset image column")
    parser.add_argument("--caption-column", default="caption", help="--hf-dataset caption column")
    parser.add_argument("--device", default="cpu", help="torch device for the models (default cpu)")
    parser.add_argument(
        "--prefetch", type=int, default=2, help="batches decoded and prepared ahead in a thread (0: none)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import logging

    from clocmllm.vesl.pipeline import label

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Folders are passed through: label() loads the models only if some shard is left to do.
    summary = label(
        args.out,
        detector=args.detector,
        images=args.images,
        list_file=args.list_file,
        hf_dataset=args.hf_dataset,
        captions=args.captions,
        captioner=args.captioner,
        caption_prompt=args.caption_prompt,
        device=args.device,
        image_size=args.image_size,
        threshold=args.threshold,
        shard_size=args.shard_size,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        batch_size=args.batch_size,
        max_phrases=args.max_phrases,
        image_column=args.image_column,
        caption_column=args.caption_column,
        prefetch=args.prefetch,
        progress=not args.no_progress,
    )
    print(
        f"{summary.out}: {len(summary.shards_done_now)} shard(s) labelled now, "
        f"{len(summary.shards_skipped)} already done, {summary.shards_total} in all; "
        f"{summary.images} images ({summary.skipped_images} skipped), {summary.regions} regions"
    )
    return 0
