"""Non-maximum suppression in plain torch (the project never installs torchvision)."""

from __future__ import annotations

import numpy as np
import torch


def box_iou_matrix(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of corner boxes `(N, 4)` -> `(N, N)`."""
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of kept boxes, highest score first: greedy NMS, a box is dropped when its IoU with
    an already kept box is above `iou_threshold` (the same rule as torchvision.ops.nms)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True, stable=True)
    over = (box_iou_matrix(boxes[order].float()) > iou_threshold).numpy()
    n = order.numel()
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    # The overlap matrix is computed once in torch; the greedy loop runs over numpy rows, whose
    # per-step cost is a microsecond where a torch op costs ten (hundreds of boxes per image).
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each label separately (boxes of different phrases never suppress each other).

    Offsetting each label's boxes by a distinct amount makes boxes of different labels disjoint,
    so one NMS call does all labels at once (torchvision's trick).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)
