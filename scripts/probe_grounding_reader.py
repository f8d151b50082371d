"""How well can a purpose-built reader ground expressions from a frozen tower's patch tokens?

Command (after `clocmllm demo --workdir DIR`; ~2.5 min a tower on one CPU core):
    .venv/bin/python scripts/probe_grounding_reader.py --world DIR/world \
        --tower DIR/export_clip --tower DIR/export_cloc [--steps 3000] [--layer -1]
Expected (docs/demo.md, "Grounding, third pass"): on the old demo recipe's towers ~0.34
Acc@0.5 for both CLIP and CLOC, far above the MLLM's ~0.03 from the same tokens: the
from-scratch LLM, not the tokens, is the first bottleneck of the demo's grounding.

The reader is a one-hop model trained with direct box supervision, a ceiling for what the
tokens offer to a reader that needs no language modelling: a bag of words of the expression
("the small red circle", from every region's referring expressions in the train split) ->
one transformer layer -> one cross-attention over the tower's patch tokens (layer `--layer`,
read through `VisionTower` as the MLLM reads them, plus a learned 2-D position per patch) ->
MLP -> box; loss 5 * L1 + (1 - GIoU); AdamW 2e-3, batch 64, seed 0. Scored as the MLLM is:
Acc@0.5 on every grounding turn of the eval conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_EXPR = re.compile(r"(the .*?)(?: and give its box)?[?.]$")


def patch_tokens(tower, split: Path, images: list[str]):
    import torch
    from PIL import Image

    out = []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            pix = []
            for name in images[i : i + 128]:
                with Image.open(split / name) as im:
                    pix.append(tower.preprocess(im.convert("RGB"))[0])
            selected, _ = tower(torch.stack(pix))
            out.append(selected[:, -tower.grid * tower.grid :])
    return torch.cat(out)


def reader_class():
    import torch
    from torch import nn

    class Reader(nn.Module):
        def __init__(self, vocab: int, dim: int, patches: int, width: int = 64, words: int = 8):
            super().__init__()
            self.words = words
            self.emb = nn.Embedding(vocab, width, padding_idx=0)
            self.word_pos = nn.Parameter(torch.randn(words, width) * 0.02)
            self.query = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True)
            self.kv = nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width))
            self.patch_pos = nn.Parameter(torch.randn(patches, width) * 0.02)
            self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
            self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))

        def forward(self, tokens, ids):
            keep = (ids > 0)[..., None]
            q = self.query(self.emb(ids) + self.word_pos, src_key_padding_mask=ids == 0)
            q = (q * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
            kv = self.kv(tokens) + self.patch_pos
            c = torch.sigmoid(self.head(self.attn(q, kv, kv)[0][:, 0]))
            return torch.cat([torch.minimum(c[:, :2], c[:, 2:]), torch.maximum(c[:, :2], c[:, 2:])], 1)

    return Reader


def run(world: Path, folder: Path, steps: int, layer: int, log_every: int) -> float:
    import torch

    from clocmllm.mllm.proposer import box_iou
    from clocmllm.mllm.tower import TowerConfig, VisionTower

    torch.manual_seed(0)
    tower = VisionTower(TowerConfig(str(folder), layer=layer, region="roi_align")).eval()
    train = [json.loads(line) for line in (world / "train" / "regions.jsonl").read_text().splitlines()]
    x_train = patch_tokens(tower, world / "train", [r["image"] for r in train])
    triples = [
        (i, ref, [c / r["width"] for c in g["box"]])
        for i, r in enumerate(train)
        for g in r["regions"]
        for ref in g.get("refs", [])
    ]
    chats = [
        c for c in json.loads((world / "eval" / "conversations.json").read_text()) if c["task"] == "grounding"
    ]
    x_eval = patch_tokens(tower, world / "eval", [c["image"] for c in chats])
    evals = []
    for j, c in enumerate(chats):
        for q, box in zip(c["conversations"][0::2], c["boxes"], strict=False):
            m = _EXPR.search(q["value"].split("\n")[-1])
            if m is None:
                raise ValueError(f"eval conversation {c['id']}: no expression in {q['value']!r}")
            evals.append((j, m.group(1), [v / c["width"] for v in box]))
    vocab = {w: k + 1 for k, w in enumerate(sorted({w for _, e, _ in triples + evals for w in e.split()}))}

    def encode(exprs):
        ids = torch.zeros(len(exprs), 8, dtype=torch.long)
        for i, e in enumerate(exprs):
            w = [vocab[t] for t in e.split()][:8]
            ids[i, : len(w)] = torch.tensor(w)
        return ids

    reader = reader_class()(len(vocab) + 1, x_train.shape[-1], tower.grid**2)
    opt = torch.optim.AdamW(reader.parameters(), 2e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    ev_x, ev_ids = x_eval[[e[0] for e in evals]], encode([e[1] for e in evals])
    ev_y = torch.tensor([e[2] for e in evals])

    def score() -> float:
        with torch.no_grad():
            iou, _ = box_iou(reader(ev_x, ev_ids), ev_y)
        return float((iou >= 0.5).float().mean())

    for step in range(1, steps + 1):
        batch = [triples[k] for k in rng.integers(len(triples), size=64)]
        pred = reader(x_train[[t[0] for t in batch]], encode([t[1] for t in batch]))
        true = torch.tensor([t[2] for t in batch])
        _, giou = box_iou(pred, true)
        loss = 5 * (pred - true).abs().mean() + (1 - giou).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(f"  step {step}: loss {loss.item():.3f}, eval Acc@0.5 {score():.3f}", flush=True)
    return score()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, required=True, help="a world folder with train/ and eval/")
    ap.add_argument("--tower", type=Path, action="append", required=True, help="exported tower folder(s)")
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--log-every", type=int, default=500)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    for folder in args.tower:
        print(f"{folder}: training the reader ({args.steps} steps)", flush=True)
        acc = run(args.world, folder, args.steps, args.layer, args.log_every)
        print(f"{folder}: grounding Acc@0.5 {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
