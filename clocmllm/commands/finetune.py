"""`clocmllm finetune --config FILE [--set key=value ...]`: thin layer over `clocmllm.mllm.train.finetune`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (see scripts/recipes/mllm_*.yaml)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable; value parsed as YAML)",
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    from clocmllm.mllm.config import load_config
    from clocmllm.mllm.train import finetune

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.sets)
    out = finetune(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line from a multi-process launch, not one per rank
        print(f"saved model to {out}")
    return 0
