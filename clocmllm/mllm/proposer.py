"""Class-agnostic box proposals from a frozen tower's patch tokens, for proposal grounding.

Why: a from-scratch LLM writing box coordinates as text did not learn to localise at all in
the demo's budget (grounding Acc@0.5 0.01-0.05 over a dozen variants, docs/demo.md), while
the CLOC prompter's region embeddings tell objects apart well (region R@1 0.68). Proposal
grounding (as in Groma, Ma et al. 2024) splits the job: this head proposes K boxes, each
proposal enters the prompt as a candidate token `<rK>` carrying its region feature (prompter
or RoI-Align, `tower.region_features`), and the LLM grounds by *naming* a candidate; the
chat renders that name as the box `[x1, y1, x2, y2]` on the 0-999 grid (inference.py).

The head is OWL-ViT's idea in small: every patch token of the tower's last block (plus a
learned position) predicts an objectness logit and one box around its cell (centre offset
within one cell, log width/height). Training assigns each object to the patch that holds its
centre (objectness BCE, 5 L1 + GIoU on the assigned patches). `propose` keeps the K best after
greedy NMS and lists them in reading order (rows of cells top to bottom, then left to right),
so a candidate's index also says roughly where it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "proposer_config.json"
WEIGHTS_FILE = "proposer.safetensors"
FORMAT = "clocmllm-proposer"


@dataclass
class ProposerConfig:
    grid: int  # patches per side of the tower
    dim: int  # the tower's width
    width: int = 128  # hidden width of the head's MLP
    k: int = 8  # proposals per image (= candidate tokens in the prompt)
    nms_iou: float = 0.5

    def __post_init__(self) -> None:
        if self.k < 1 or self.grid < 1 or self.dim < 1:
            raise ValueError(f"proposer config: grid, dim and k must be positive, got {self}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"proposer config: nms_iou must be in (0, 1], got {self.nms_iou}")

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_tokens(k: int) -> list[str]:
    return [f"<r{i}>" for i in range(k)]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise over [..., 4] xyxy boxes -> (IoU, GIoU)."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda t: (t[..., 2:] - t[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    union = area(a) + area(b) - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return iou, iou - (hull - union) / hull.clamp(min=1e-9)


def reading_order(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Indices that sort [K, 4] boxes by the row of their centre's cell, then by centre x."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    row = (cy * grid).floor().clamp(0, grid - 1)
    return torch.argsort(row * 2.0 + cx.clamp(0, 1), stable=True)


class BoxProposer(nn.Module):
    def __init__(self, config: ProposerConfig):
        super().__init__()
        self.config = config
        n = config.grid * config.grid
        self.pos = nn.Parameter(torch.randn(n, config.dim) * 0.02)
        self.mlp = nn.Sequential(
            nn.LayerNorm(config.dim),
            nn.Linear(config.dim, config.width),
            nn.GELU(),
            nn.Linear(config.width, config.width),
            nn.GELU(),
            nn.Linear(config.width, 5),
        )
        idx = torch.arange(n)
        self.register_buffer("cells", torch.stack([idx % config.grid, idx // config.grid], -1).float(), False)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, G*G, D] patch tokens -> (objectness logits [B, G*G], unit boxes [B, G*G, 4])."""
        g = self.config.grid
        if patches.shape[-2:] != (g * g, self.config.dim):
            raise ValueError(
                f"proposer: expected [B, {g * g}, {self.config.dim}] patch tokens, got {list(patches.shape)} "
                "(a proposer trained for another tower?)"
            )
        out = self.mlp(patches + self.pos)
        centre = (self.cells + 0.5 + torch.tanh(out[..., 1:3])) / g
        size = torch.exp(out[..., 3:5].clamp(-6.0, 2.0)) * (2.0 / g)
        boxes = torch.cat([centre - size / 2, centre + size / 2], -1).clamp(0.0, 1.0)
        return out[..., 0], boxes

    @torch.no_grad()
    def propose(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (K boxes [B, K, 4] in reading order, their objectness probabilities [B, K]).

        Always exactly K: when NMS leaves fewer, the best suppressed boxes fill the rest.
        """
        logits, boxes = self(patches)
        k, out_b, out_s = self.config.k, [], []
        for lo, bx in zip(logits, boxes, strict=True):
            order = torch.argsort(lo, descending=True).tolist()
            keep: list[int] = []
            for j in order:
                if len(keep) == k:
                    break
                if keep and float(box_iou(bx[j][None], bx[keep])[0].max()) > self.config.nms_iou:
                    continue
                keep.append(j)
            keep += [j for j in order if j not in keep][: k - len(keep)]
            sel = torch.tensor(keep)
            ro = reading_order(bx[sel], self.config.grid)
            out_b.append(bx[sel][ro])
            out_s.append(torch.sigmoid(lo[sel][ro]))
        return torch.stack(out_b), torch.stack(out_s)

    # ---- files ---------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": 1, **self.config.to_dict(), **(extra or {})}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        sd = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(sd, folder / WEIGHTS_FILE, metadata={"format": "pt"})

    @classmethod
    def from_folder(cls, folder: str | Path) -> BoxProposer:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_file = folder / CONFIG_FILE
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (train one with `clocmllm proposer`)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
        known = ProposerConfig.__dataclass_fields__
        model = cls(ProposerConfig(**{k: v for k, v in meta.items() if k in known}))
        missing, unexpected = model.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_FILE}: missing {missing}, unexpected {unexpected}")
        return model


def last_patches(tower, pixels: torch.Tensor) -> torch.Tensor:
    """A `VisionTower`'s last-block patch tokens [B, G*G, D] (class token dropped): what the
    proposer reads, in its training, in the data pipeline and in chat alike."""
    with torch.no_grad():
        _, last = tower(pixels)
    return last[:, -tower.grid * tower.grid :]


def name_candidates(
    answers: list[list[float]], boxes: torch.Tensor, scores: torch.Tensor, grid: int, inject: bool
) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """Which candidate each answer box is, for training text.

    `answers`: unit boxes the assistant writes; `boxes`/`scores`: the K proposals. With
    `inject`, an answer that no proposal covers (IoU < 0.5) replaces the least confident
    proposal not already named, so every training answer has a right candidate to name (the
    proposer's misses are counted by the caller); it gets the neutral confidence 0.5, since the
    proposer never vouched for it. Returns (candidates in reading order, their confidences,
    the index each answer names, answers injected).
    """
    boxes, scores = boxes.clone(), scores.clone()
    chosen: list[int] = []
    injected = 0
    for a in answers:
        t = torch.tensor(a, dtype=boxes.dtype)
        ious = box_iou(t[None], boxes)[0]
        best = int(ious.argmax())
        if float(ious[best]) < 0.5 and inject:
            free = [j for j in torch.argsort(scores).tolist() if j not in chosen]
            if free:
                best = free[0]
                boxes[best], scores[best] = t, 0.5
                injected += 1
        chosen.append(best)
    order = reading_order(boxes, grid)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    names = [int(rank[j]) for j in chosen]
    boxes, scores = boxes[order], scores[order]
    return boxes, scores, names, injected


# ---- training targets and loss ------------------------------------------------------------
def assign_targets(gt: list[torch.Tensor], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image [n, 4] unit boxes -> (objectness [B, G*G], target boxes [B, G*G, 4]).

    Each object goes to the cell holding its centre; when two share a cell the larger wins
    (the smaller is counted out of the loss, which the world's spacing makes rare).
    """
    obj = torch.zeros(len(gt), grid * grid)
    tbox = torch.zeros(len(gt), grid * grid, 4)
    for i, boxes in enumerate(gt):
        if boxes.numel() == 0:
            continue
        area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
        for j in torch.argsort(area).tolist():  # larger ones last: they overwrite
            b = boxes[j]
            cx = int(((b[0] + b[2]) / 2 * grid).clamp(0, grid - 1e-3))
            cy = int(((b[1] + b[3]) / 2 * grid).clamp(0, grid - 1e-3))
            obj[i, cy * grid + cx] = 1.0
            tbox[i, cy * grid + cx] = b
    return obj, tbox


def proposal_loss(
    logits: torch.Tensor, boxes: torch.Tensor, obj: torch.Tensor, tbox: torch.Tensor, pos_weight: float = 4.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Objectness BCE over every cell + (5 L1 + (1 - GIoU)) over the assigned cells."""
    bce = F.binary_cross_entropy_with_logits(
        logits, obj, pos_weight=torch.tensor(pos_weight, dtype=logits.dtype)
    )
    pos = obj > 0
    if bool(pos.any()):
        l1 = (boxes[pos] - tbox[pos]).abs().mean()
        giou = (1 - box_iou(boxes[pos], tbox[pos])[1]).mean()
    else:
        l1 = giou = logits.sum() * 0.0
    loss = bce + 5 * l1 + giou
    parts = {"objectness": bce, "l1": l1, "giou": giou, "loss": loss}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def recall_at(proposals: torch.Tensor, gt: list[torch.Tensor], threshold: float = 0.5) -> tuple[int, int]:
    """(objects covered by some proposal with IoU >= threshold, objects)."""
    hit = total = 0
    for props, boxes in zip(proposals, gt, strict=True):
        for b in boxes:
            total += 1
            hit += int(float(box_iou(b[None], props)[0].max()) >= threshold)
    return hit, total
