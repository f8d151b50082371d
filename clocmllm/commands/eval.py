"""`clocmllm eval encoder|mllm`: dispatches to the encoder (JAX) or MLLM (torch) evaluator."""

from __future__ import annotations

import argparse
import importlib

TARGETS = {
    "encoder": ("clocmllm.commands.eval_encoder", "zero-shot evaluation of a JAX encoder checkpoint"),
    "mllm": ("clocmllm.commands.eval_mllm", "grounding Acc@0.5 and referring accuracy of an MLLM"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True)
    for name, (module_name, help_text) in TARGETS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            p.set_defaults(_missing=name)
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_missing", None):
        print(f"clocmllm eval {args._missing}: not built yet.")
        return 2
    return args._run(args)
