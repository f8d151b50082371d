"""How often can a purpose-built selector pick the right proposal, from the MLLM's own inputs?

Command (after `clocmllm demo --workdir DIR`; ~30 s on one CPU core):
    .venv/bin/python scripts/probe_proposal_selector.py --model DIR/mllm_cloc/stage2/model \
        --world DIR/world [--steps 1500]
Expected (docs/demo.md, "Grounding, fifth pass"): ~0.68 Acc@0.5 on the demo's CLOC tower
(0.676 on the session-5 demo, proposals covering 0.858 of the targets), against the MLLM's
0.45-0.64: the ceiling the proposals and region features allow to a selector that needs no
language modelling.

The selector sees what the MLLM's pointer sees, minus the LLM: the model's frozen proposer
gives K boxes an image (`ChatSession`'s proposals), the tower gives each its region feature
(`VisionTower.region_features`), and a small scorer matches them against the expression's
words (one transformer layer over word embeddings, mean-pooled) by a dot product with an MLP
of [region feature, proposer log-odds]. Trained with cross-entropy on the proposal that best
covers the truth (IoU >= 0.5, else the example is skipped) for every region's referring
expressions and every grounding turn of the train split; AdamW 2e-3, batch 64, seed 0.
Scored as the MLLM is: Acc@0.5 of the chosen proposal on every grounding turn of the eval
conversations.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_WORDS = 10


def proposals_and_features(model, split: Path, images: list[str]):
    """-> (region features [N, K, D], unit boxes [N, K, 4], confidences [N, K]) per image."""
    import torch
    from PIL import Image

    from clocmllm.mllm.proposer import last_patches

    feats, boxes, scores = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), 200):
            pix = []
            for name in images[i : i + 200]:
                with Image.open(split / name) as im:
                    pix.append(model.tower.preprocess(im)[0])
            pix = torch.stack(pix)
            selected, last = model.tower(pix)
            b, s = model.proposer.propose(last_patches(model.tower, pix))
            feats.append(model.tower.region_features(selected, last, b))
            boxes.append(b)
            scores.append(s)
    return torch.cat(feats), torch.cat(boxes), torch.cat(scores)


def examples(split: Path, records: list[dict], with_region_refs: bool) -> list[tuple[int, str, list[float]]]:
    """(image index, expression, unit truth box) for each grounding turn (and region ref)."""
    import torch
    from probe_grounding_reader import _EXPR

    index = {r["image"]: i for i, r in enumerate(records)}
    out = []
    for c in json.loads((split / "conversations.json").read_text()):
        if c["task"] != "grounding":
            continue
        for q, box in zip(c["conversations"][0::2], c["boxes"], strict=False):
            m = _EXPR.search(q["value"].split("\n")[-1])
            if m:
                out.append((index[c["image"]], m.group(1), torch.tensor([v / c["width"] for v in box])))
    if with_region_refs:
        for i, r in enumerate(records):
            for g in r["regions"]:
                unit = torch.tensor([v / r["width"] for v in g["box"]])
                out += [(i, ref, unit) for ref in g.get("refs", [])]
    return out


def run(model_dir: Path, world: Path, steps: int) -> tuple[float, float, int]:
    import numpy as np
    import torch
    from torch import nn

    from clocmllm.mllm.proposer import box_iou
    from clocmllm.mllm.save import load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, _ = load_model(model_dir)
    if model.proposer is None:
        raise SystemExit(f"{model_dir}: the model has no proposer (proposal grounding is off)")
    data = {}
    for split in ("train", "eval"):
        recs = [json.loads(x) for x in (world / split / "regions.jsonl").read_text().splitlines()]
        data[split] = (proposals_and_features(model, world / split, [r["image"] for r in recs]),
                       examples(world / split, recs, with_region_refs=split == "train"))  # fmt: skip
    (f_tr, b_tr, s_tr), train = data["train"]
    (f_ev, b_ev, s_ev), evals = data["eval"]
    vocab = {w: k + 1 for k, w in enumerate(sorted({w for _, e, _ in train + evals for w in e.split()}))}

    def encode(expr: str) -> torch.Tensor:
        ids = [vocab[w] for w in expr.split()][:MAX_WORDS]
        return torch.tensor(ids + [0] * (MAX_WORDS - len(ids)))

    def best(boxes: torch.Tensor, truth: torch.Tensor) -> tuple[int, float]:
        iou, _ = box_iou(boxes, truth[None].expand(len(boxes), 4))
        return int(iou.argmax()), float(iou.max())

    class Selector(nn.Module):
        def __init__(self, dim: int, width: int = 64):
            super().__init__()
            self.emb = nn.Embedding(len(vocab) + 1, width, padding_idx=0)
            self.pos = nn.Parameter(torch.randn(MAX_WORDS, width) * 0.02)
            self.words = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True)
            self.key = nn.Sequential(nn.Linear(dim + 1, width), nn.GELU(), nn.Linear(width, width))

        def forward(self, ids, feats, scores):  # [B, W], [B, K, D], [B, K] -> [B, K]
            q = self.words(self.emb(ids) + self.pos, src_key_padding_mask=ids == 0)
            keep = (ids > 0)[..., None]
            q = (q * keep).sum(1) / keep.sum(1)
            k = self.key(torch.cat([feats, torch.logit(scores, 1e-4)[..., None]], -1))
            return torch.einsum("bkw,bw->bk", k, q)

    targets = [(i, encode(e), *best(b_tr[i], t)) for i, e, t in train]
    targets = [x for x in targets if x[3] >= 0.5]
    print(f"train: {len(targets)} of {len(train)} expressions have a covering proposal", flush=True)
    sel = Selector(f_tr.shape[-1])
    opt = torch.optim.AdamW(sel.parameters(), 2e-3, weight_decay=0.01)
    for _step in range(steps):
        batch = [targets[j] for j in rng.integers(len(targets), size=64)]
        idx = torch.tensor([x[0] for x in batch])
        logits = sel(torch.stack([x[1] for x in batch]), f_tr[idx], s_tr[idx])
        loss = nn.functional.cross_entropy(logits, torch.tensor([x[2] for x in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    hits = covered = 0
    with torch.no_grad():
        for i, expr, truth in evals:
            k = int(sel(encode(expr)[None], f_ev[i : i + 1], s_ev[i : i + 1])[0].argmax())
            hits += best(b_ev[i][k : k + 1], truth)[1] >= 0.5
            covered += best(b_ev[i], truth)[1] >= 0.5
    return hits / len(evals), covered / len(evals), len(evals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="an MLLM folder with a proposer")
    ap.add_argument("--world", type=Path, required=True, help="a world folder with train/ and eval/")
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    acc, coverage, n = run(args.model, args.world, args.steps)
    print(f"{args.model}: selector Acc@0.5 {acc:.3f}, proposals cover {coverage:.3f} (n={n} grounding turns)")


if __name__ == "__main__":
    main()
