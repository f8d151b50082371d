"""Chat inference: prompt building, greedy decoding with KV cache and streaming, boxes in and out.

Library for `clocmllm chat`, the evaluator, the demo and the web server. A user box is given
in original-image pixels; it is written into the prompt on this model's 0–999 grid, followed
by `<region>` (whose feature comes from the exact pixel box). Boxes in the answer are parsed
with `clocmllm.boxes.parse_boxes` and mapped back to pixels through the same geometry.

A model with a proposer (proposal grounding, `proposer.py`) sees the image's K candidates
`<r0> ... <rK-1>` after `<image>`, as in training, and names one to ground; the answer text
shows each name as its box `[x1, y1, x2, y2]` (the raw names stay in the chat history).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from clocmllm.boxes import format_box, parse_boxes, unit_to_grid
from clocmllm.mllm import templates
from clocmllm.mllm.dataset import tokenize_segments
from clocmllm.mllm.tokenizer import IMAGE_TOKEN, REGION_TOKEN

DEFAULT_REFERRING = "What is the object at {box}?"


@dataclass
class Answer:
    text: str
    grid_boxes: list[list[int]]  # as parsed from the text
    pixel_boxes: list[list[float]]  # in original image pixels
    new_tokens: int = 0


class _CallbackStreamer:
    """Minimal `BaseStreamer`: skips the prompt, emits decoded text deltas to a callback."""

    def __init__(self, decode: Callable[[list[int]], str], callback: Callable[[str], None]):
        self.decode, self.callback = decode, callback
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.decode(self.ids)
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.callback(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        pass


def user_text(
    prompt: str | None, box_grid: list[int] | None, first: bool, image_position: str = "first"
) -> str:
    """The user's message: `{box}` in the prompt (or the default question) gets `[..] <region>`.

    A `<region>` typed by the user stands for `{box}` (a frequent first try); any other count of
    region tokens than boxes is refused here, with what to write, instead of deep in the model.
    """
    text = prompt or ""
    if box_grid is not None:
        box_text = f"{format_box(box_grid)} {REGION_TOKEN}"
        if not text:
            text = DEFAULT_REFERRING
        if "{box}" not in text and REGION_TOKEN in text:
            text = text.replace(REGION_TOKEN, "{box}", 1)
        text = text.replace("{box}", box_text, 1) if "{box}" in text else f"{text} {box_text}"
    wanted = 0 if box_grid is None else 1
    if text.count(REGION_TOKEN) != wanted or "{box}" in text:
        raise ValueError(
            f"the question refers to {text.count(REGION_TOKEN) + text.count('{box}')} region(s) but "
            f"{wanted} box was given: pass one box (--box x1,y1,x2,y2, or /box in a chat) and write "
            "{box} (or <region>) once where it goes in the question"
        )
    if first and (IMAGE_TOKEN not in text or image_position != "first"):
        text = templates.place_image(text, image_position, IMAGE_TOKEN)
    return text


@dataclass
class ChatSession:
    """A multi-turn conversation about one image."""

    model: object
    tokenizer: object
    image: Image.Image
    max_new_tokens: int = 64
    use_cache: bool = True
    turns: list[templates.Turn] = field(default_factory=list)
    region_boxes: list[list[float]] = field(default_factory=list)
    candidates: list[list[float]] = field(default_factory=list)  # proposal grounding's K unit boxes
    candidate_scores: list[float] = field(default_factory=list)  # and the proposer's confidences

    def __post_init__(self) -> None:
        self.pixel_values, self.geometry = self.model.tower.preprocess(self.image)
        proposer = getattr(self.model, "proposer", None)
        if proposer is not None and not self.candidates:
            from clocmllm.mllm.proposer import last_patches

            device = next(self.model.parameters()).device
            boxes, scores = proposer.propose(
                last_patches(self.model.tower, self.pixel_values[None].to(device))
            )
            self.candidates, self.candidate_scores = boxes[0].tolist(), scores[0].tolist()

    def render(self, ids: list[int], names: bool = False) -> str:
        """Decoded answer; candidate names become their boxes (or stay `<rk>` with `names`)."""
        cand_ids = list(getattr(self.model.config, "candidate_token_ids", []) or [])
        pieces, chunk = [], []
        for t in ids:
            if t in cand_ids:
                pieces += [
                    self.tokenizer.decode(chunk, skip_special_tokens=True),
                    self._name(t, cand_ids.index(t), names),
                ]
                chunk = []
            else:
                chunk.append(t)
        pieces.append(self.tokenizer.decode(chunk, skip_special_tokens=True))
        return " ".join(p.strip() for p in pieces if p.strip())

    def _name(self, token_id: int, k: int, raw: bool) -> str:
        """Candidate k's box, or the name token itself (`<rk>`) when raw or k has no box."""
        if raw or k >= len(self.candidates):
            return self.tokenizer.convert_ids_to_tokens(token_id)
        return format_box(unit_to_grid(self.candidates[k]))

    def ask(
        self, prompt: str | None, box: list[float] | None = None, stream: Callable[[str], None] | None = None
    ) -> Answer:
        """One user turn -> the model's answer (streamed to `stream` as it is decoded)."""
        grid = self.geometry.to_grid(box) if box is not None else None
        if box is not None:
            self.region_boxes.append(self.geometry.to_unit(box))
        position = getattr(self.model.config, "image_position", "first")
        text = user_text(prompt, grid, first=not self.turns, image_position=position)
        if self.candidates and not self.turns:
            where = getattr(self.model.config, "candidate_position", "after_image")
            text = templates.insert_candidates(text, len(self.candidates), where)
        self.turns.append(("user", text))
        tok, model = self.tokenizer, self.model
        segs = templates.segments(model.config.template, self.turns, tok, generation_prompt=True)
        ids, _ = tokenize_segments(segs, tok, model.tower.num_tokens)
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        boxes = torch.tensor([self.region_boxes], dtype=torch.float32, device=device).reshape(1, -1, 4)
        streamer = _CallbackStreamer(self.render, stream) if stream else None
        cands = conf = None
        if self.candidates:
            cands = torch.tensor([self.candidates], dtype=torch.float32, device=device)
            conf = torch.tensor([self.candidate_scores or [0.5] * len(self.candidates)], device=device)
        new = model.generate(
            input_ids,
            pixel_values=self.pixel_values[None].to(device),
            region_boxes=boxes,
            candidate_boxes=cands,
            candidate_scores=conf,
            max_new_tokens=self.max_new_tokens,
            use_cache=self.use_cache,
            streamer=streamer,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0]
        new_ids = new.tolist()
        text = self.render(new_ids)
        self.turns.append(("assistant", self.render(new_ids, names=True)))
        grid_boxes = parse_boxes(text)
        pixels = [self.geometry.from_grid(b) for b in grid_boxes]
        return Answer(text, grid_boxes, pixels, int(new.numel()))


def answer(
    model, tokenizer, image: Image.Image, prompt: str | None, box: list[float] | None = None, **kw
) -> Answer:
    """One-shot question about an image (see `ChatSession.ask`)."""
    stream = kw.pop("stream", None)
    return ChatSession(model, tokenizer, image, **kw).ask(prompt, box, stream=stream)


def draw_boxes(image: Image.Image, boxes: list[list[float]], out: str | Path, colour: str = "red") -> Path:
    """Draw pixel boxes on a copy of the image; written atomically as PNG."""
    out = Path(out)
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 200))
    for i, b in enumerate(boxes):
        draw.rectangle([float(c) for c in b], outline=colour, width=width)
        draw.text((b[0] + 2, b[1] + 1), str(i + 1), fill=colour)
    tmp = out.with_name(out.stem + ".tmp.png")
    canvas.save(tmp, format="PNG")
    tmp.replace(out)
    return out
