"""`clocmllm serve --model DIR [--host 127.0.0.1] [--port 7860]`: the web chat (clocmllm/web)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved MLLM folder (clocmllm finetune output)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-new-tokens", type=int, default=64)


def make_responder(model_dir: str, max_new_tokens: int = 64):
    """A web Responder backed by a saved MLLM: one fresh conversation per question."""
    from clocmllm.mllm.inference import answer
    from clocmllm.mllm.save import load_model

    model, tokenizer = load_model(model_dir)

    def respond(image, prompt, box):
        ans = answer(model, tokenizer, image, prompt, box, max_new_tokens=max_new_tokens)
        return ans.text, ans.pixel_boxes

    return respond


def run(args: argparse.Namespace) -> int:
    from clocmllm.web.server import serve_forever

    serve_forever(make_responder(args.model, args.max_new_tokens), args.host, args.port)
    return 0
