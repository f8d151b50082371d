"""`clocmllm import-clip`: a local Hugging Face CLIP folder (safetensors) -> JAX checkpoint.

Thin layer over `clocmllm.adapters.import_clip.import_clip`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="local CLIPModel or CLIPVisionModel folder (safetensors)")
    parser.add_argument("--out", required=True, help="workdir to write (config.yaml + checkpoints/0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the parts initialised fresh")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="ModelConfig field the folder does not fix, e.g. text_layers=6 (YAML value; repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    import yaml

    from clocmllm.adapters.hf_config import ExportError
    from clocmllm.adapters.import_clip import import_clip

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"clocmllm import-clip: --set {item!r}: expected FIELD=VALUE", file=sys.stderr)
            return 2
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        import_clip(args.hf, args.out, seed=args.seed, overrides=overrides)
    except (ExportError, FileNotFoundError) as err:
        print(f"clocmllm import-clip: {err}", file=sys.stderr)
        return 1
    return 0
