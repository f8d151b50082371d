"""`clocmllm demo`: the whole pipeline on the synthetic world (see clocmllm/demo.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", default="runs/demo", help="where every stage writes (resumes if it exists)"
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny sizes, ≤ 3 minutes")
    parser.add_argument(
        "--recipes", default=None, help="comma-separated pretraining recipes to compare (default: clip,cloc)"
    )


def example_question(workdir: str) -> tuple[str, str]:
    """The first eval image and a grounding question about an object that is in it."""
    import json
    from pathlib import Path

    eval_dir = Path(workdir) / "world" / "eval"
    try:
        first = json.loads((eval_dir / "regions.jsonl").read_text().splitlines()[0])
        region = first["regions"][0]
        ref = (region.get("refs") or [f"the {region['text']}"])[-1]
        return str(eval_dir / first["image"]), f"Locate {ref}."
    except (OSError, ValueError, KeyError, IndexError):
        return str(eval_dir / "images" / "000000.png"), "Locate the ring."


def run(args: argparse.Namespace) -> int:
    from clocmllm.demo import run_demo
    from clocmllm.demo_report import table_markdown, targets_markdown

    recipes = tuple(r.strip() for r in args.recipes.split(",")) if args.recipes else None
    report = run_demo(args.workdir, quick=args.quick, recipes=recipes)
    print()
    print(table_markdown(report))
    print()
    print(targets_markdown(report))
    not_built = sorted({s["message"] for s in report["stages"].values() if s["status"] == "not_built"})
    if not_built:
        print("\nNot built yet, so not measured:")
        for msg in not_built:
            print(f"  - {msg}")
    failed = [n for n, s in report["stages"].items() if s["status"] == "failed"]
    print(f"\nReport: {args.workdir}/report.md and report.json")
    cloc_model = f"{args.workdir}/mllm_cloc/stage2/model"
    if report["stages"].get("finetune_cloc", {}).get("status") == "done":
        image, question = example_question(args.workdir)
        print(
            f"Chat with the result:\n  clocmllm chat --model {cloc_model} --image {image} --prompt '{question}'"
        )
        print(f"  clocmllm serve --model {cloc_model}")
    if failed:
        print(f"\nFailed stages: {', '.join(failed)} (logs in {args.workdir}/logs/)")
        return 1
    return 0
