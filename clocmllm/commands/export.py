"""`clocmllm export`: a JAX checkpoint -> Hugging Face CLIP folder + prompter, parity-checked.

Thin layer over `clocmllm.adapters.export.export_encoder`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="WORKDIR (latest step) or WORKDIR/checkpoints/STEP"
    )
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--full-clip", action="store_true", help="write a whole CLIPModel instead of CLIPVisionModel"
    )
    parser.add_argument("--text", action="store_true", help="also write text/ (CLIPTextModelWithProjection)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="parity tolerance (default 1e-4)")


def run(args: argparse.Namespace) -> int:
    from clocmllm.adapters.export import export_encoder
    from clocmllm.adapters.hf_config import ExportError

    try:
        export_encoder(
            args.checkpoint,
            args.out,
            force=args.force,
            full_clip=args.full_clip,
            text=args.text,
            tolerance=args.tolerance,
        )
    except (ExportError, FileExistsError, FileNotFoundError) as err:
        print(f"clocmllm export: {err}", file=sys.stderr)
        return 1
    return 0
