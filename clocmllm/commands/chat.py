"""`clocmllm chat --model DIR --image IMG [--prompt TEXT] [--box x1,y1,x2,y2]`: one-shot or interactive.

Thin layer over `clocmllm.mllm.inference.ChatSession`. The answer streams to the terminal; boxes
in it are drawn on a copy of the image and the PNG path is printed. `--box` is in original
pixels; put `{box}` in the prompt to place it, else it is appended (with `<region>`).
Interactive mode (no --prompt): one question per line; `/box x1,y1,x2,y2 question` refers to
a box; an empty line or `/quit` ends.
"""

from __future__ import annotations

import argparse
import sys


def _box(text: str) -> list[float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--box expects x1,y1,x2,y2 in pixels, got {text!r}")
    return [float(p) for p in parts]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved MLLM folder (clocmllm finetune output)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default=None, help="one-shot question; omit for an interactive session")
    parser.add_argument("--box", type=_box, default=None, help="x1,y1,x2,y2 in original image pixels")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-cache", action="store_true", help="decode without the KV cache (slower)")
    parser.add_argument("--out", default=None, help="PNG with the answer's boxes (default: IMAGE.boxes.png)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image

    from clocmllm.mllm.inference import ChatSession, draw_boxes
    from clocmllm.mllm.save import load_model

    model, tok = load_model(args.model)
    image = Image.open(args.image).convert("RGB")
    session = ChatSession(model, tok, image, max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache)
    out = Path(args.out) if args.out else Path(args.image).with_suffix(".boxes.png")

    def one(prompt: str | None, box: list[float] | None) -> None:
        print("assistant: ", end="", flush=True)
        ans = session.ask(prompt, box, stream=lambda s: print(s, end="", flush=True))
        print()
        if ans.pixel_boxes:
            draw_boxes(image, ans.pixel_boxes, out)
            boxes = "; ".join(", ".join(f"{c:.1f}" for c in b) for b in ans.pixel_boxes)
            print(f"boxes (pixels): {boxes}\ndrawn: {out}")

    if args.prompt is not None or args.box is not None:
        try:
            one(args.prompt, args.box)
        except ValueError as err:  # a question whose regions and boxes do not match
            print(f"\nerror: {err}", file=sys.stderr)
            return 2
        return 0
    while True:
        try:
            line = input("you: ").strip()
        except EOFError:
            break
        if not line or line == "/quit":
            break
        box = None
        if line.startswith("/box "):
            _, spec, *rest = line.split(" ", 2)
            try:
                box = _box(spec)
            except argparse.ArgumentTypeError as err:
                print(err, file=sys.stderr)
                continue
            line = rest[0] if rest else ""
        try:
            one(line or None, box)
        except ValueError as err:
            print(f"\nerror: {err}", file=sys.stderr)
    return 0
