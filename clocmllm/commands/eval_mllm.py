"""`clocmllm eval mllm --model DIR --data FILE --json OUT`: grounding Acc@0.5 and referring accuracy.

Thin layer over `clocmllm.mllm.evaluate.evaluate`; the metric definitions are documented there.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved MLLM folder")
    parser.add_argument(
        "--data", required=True, help="conversation JSON (e.g. WORLD/eval/conversations.json)"
    )
    parser.add_argument("--json", required=True, help="where to write the metrics JSON")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--predictions", default=None, help="optional JSONL of per-sample answers")
    parser.add_argument(
        "--examples", default=None, help="folder for PNGs of grounding samples (truth green, prediction red)"
    )
    parser.add_argument("--num-examples", type=int, default=8, help="how many example PNGs to draw")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from clocmllm.mllm.evaluate import evaluate
    from clocmllm.mllm.save import load_model

    model, tok = load_model(args.model)
    result = evaluate(
        model,
        tok,
        args.data,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        predictions=args.predictions,
        examples=args.examples,
        num_examples=args.num_examples,
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(result, indent=2))
    return 0
