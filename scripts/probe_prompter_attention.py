"""Does an exported CLOC prompter look inside the box it is prompted with?

Command (after `clocmllm demo --workdir DIR`; ~10 s on one CPU core):
    .venv/bin/python scripts/probe_prompter_attention.py --world DIR/world --tower DIR/export_cloc
Expected (docs/demo.md, "Encoders, third pass"): the unmasked tiny prompter of the old demo
recipe put 17% of its patch attention on the patches whose centre is in the box, where
uniform attention would put 8%: it hardly localised. With `prompter_box_mask` it is 66%; the
rest goes to patches the box overlaps whose centres lie outside it.

For each eval region (box prompt, every head and both corner tokens) it prints the mean
attention mass on the patches inside the box, on all patches, and on the class token, next to
the share of patches inside the box (what uniform attention would give). The weights come
from the exported PyTorch prompter (`ClocPrompter.box_attention`, the same computation its
forward uses), so it measures exactly what the MLLM's referring path uses.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, required=True, help="a world folder with eval/")
    ap.add_argument("--tower", type=Path, required=True, help="an exported CLOC encoder folder")
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from clocmllm.mllm.tower import TowerConfig, VisionTower

    torch.set_num_threads(1)
    tower = VisionTower(TowerConfig(str(args.tower), layer=-1)).eval()
    if tower.prompter is None:
        raise SystemExit(f"{args.tower}: no prompter (a CLIP export?)")
    g = tower.grid
    lead = 1 if tower.prompter.config.class_token else 0
    split = args.world / "eval"
    lines = (split / "regions.jsonl").read_text().splitlines()[: args.images]
    inside, patches, cls, share = [], [], [], []
    centres = (torch.arange(g) + 0.5) / g
    with torch.no_grad():
        for line in lines:
            rec = json.loads(line)
            with Image.open(split / rec["image"]) as im:
                pixels, geom = tower.preprocess(im.convert("RGB"))
            _, last = tower(pixels[None])
            boxes = torch.tensor([list(geom.to_unit(r["box"])) for r in rec["regions"]], dtype=torch.float32)[
                None
            ]
            probs = tower.prompter.box_attention(last, boxes)[0]  # [M, H, P, T + P]
            for k, b in enumerate(boxes[0]):
                cols = (centres >= b[0]) & (centres <= b[2])
                rows = (centres >= b[1]) & (centres <= b[3])
                mask = (rows[:, None] & cols[None, :]).flatten()
                p = probs[k, ..., lead : lead + g * g]
                inside.append(p[..., mask].sum(-1).mean().item())
                patches.append(p.sum(-1).mean().item())
                cls.append(probs[k, ..., 0].mean().item() if lead else 0.0)
                share.append(mask.float().mean().item())
    print(f"{args.tower}: {len(inside)} regions of {len(lines)} eval images")
    print(f"  attention on patches inside the box (centre in box) {np.mean(inside):.3f}")
    print(f"  attention on all patches                            {np.mean(patches):.3f}")
    print(f"  attention on the class token                        {np.mean(cls):.3f}")
    print(f"  share of patches inside the box (= uniform)         {np.mean(share):.3f}")
    rel = np.mean(np.asarray(inside) / np.maximum(np.asarray(patches), 1e-9))
    print(f"  of the patch attention, the share inside the box    {rel:.3f}")


if __name__ == "__main__":
    main()
