"""RoI-Align over a ViT patch grid, in plain torch (no torchvision).

Used for region features when the tower folder has no CLOC prompter (plain CLIP). The paper
reports RoI-Align pooling far below the prompter; it is the baseline, not the method.

Choices (the paper leaves them open):
- `aligned=True` semantics: a unit coordinate `u` lands at continuous position `u * W` on the
  grid, where cell `i` has its centre at `i + 0.5`. `F.grid_sample(align_corners=False)` uses
  exactly that convention, so the sampling grid is simply `2u - 1`.
- `output_size x output_size` bins with `sampling_ratio x sampling_ratio` bilinear samples
  each, averaged per bin; the bins are then averaged into ONE vector per box, because a
  region is one `<region>` token in the LLM.
- Samples outside the grid take the border value (`padding_mode="border"`), so boxes that
  touch the padding still get a feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def roi_align(
    grid: torch.Tensor, boxes: torch.Tensor, output_size: int = 2, sampling_ratio: int = 2
) -> torch.Tensor:
    """Pool one feature vector per box.

    grid: [B, C, H, W] feature map; boxes: [B, M, 4] in [0, 1] of the grid's extent
    (x1, y1, x2, y2). Returns [B, M, C].
    """
    b, c, _, _ = grid.shape
    m = boxes.shape[1]
    if m == 0:
        return grid.new_zeros(b, 0, c)
    k = output_size * sampling_ratio
    # sample centres inside each box: fractions (j + 0.5) / k of the box extent
    t = (torch.arange(k, device=grid.device, dtype=grid.dtype) + 0.5) / k
    boxes = boxes.to(grid.dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)  # [B, M]
    xs = x1[..., None] + (x2 - x1)[..., None] * t  # [B, M, k]
    ys = y1[..., None] + (y2 - y1)[..., None] * t
    gx = xs[:, :, None, :].expand(b, m, k, k)
    gy = ys[:, :, :, None].expand(b, m, k, k)
    sample_grid = torch.stack([gx, gy], dim=-1) * 2 - 1  # [B, M, k, k, 2]
    sample_grid = sample_grid.reshape(b, m * k, k, 2)
    sampled = F.grid_sample(grid, sample_grid, mode="bilinear", padding_mode="border", align_corners=False)
    # [B, C, M*k, k] -> per-bin means -> mean over bins == mean over all samples (equal bin sizes)
    sampled = sampled.reshape(b, c, m, k * k)
    return sampled.mean(-1).transpose(1, 2)
