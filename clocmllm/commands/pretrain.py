"""`clocmllm pretrain`: CLIP / CLOC encoder pretraining in JAX (thin layer over
`clocmllm.encoder.trainer.train`)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training recipe YAML (scripts/recipes/*.yaml)")
    parser.add_argument(
        "--workdir", required=True, help="run folder; an existing one with checkpoints resumes"
    )
    parser.add_argument(
        "--data", help="region JSONL file, shard folder or world folder (overrides data.path)"
    )
    parser.add_argument("--steps", type=int, help="total training steps (overrides steps)")
    parser.add_argument(
        "--init-from",
        metavar="DIR",
        help="start a new run from these weights: an `import-clip` folder or another run "
        "(sets init_from; read only while the workdir has no checkpoint)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, dotted key and YAML value, e.g. --set model.vision_layers=2",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no tqdm bar (metrics.jsonl is still written)"
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from clocmllm.encoder.trainer import (
        IncompatibleCheckpoint,
        TrainingDiverged,
        apply_overrides,
        load_recipe,
        train,
    )

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = apply_overrides(load_recipe(args.config), args.sets)
    if args.no_progress:
        config["progress"] = False
    if args.init_from:
        config["init_from"] = args.init_from
    try:
        summary = train(config, args.workdir, data=args.data, steps=args.steps)
    except (IncompatibleCheckpoint, TrainingDiverged, ValueError, FileNotFoundError) as err:
        print(f"clocmllm pretrain: {err}")
        return 1
    print(json.dumps(summary, indent=2))
    return 0
