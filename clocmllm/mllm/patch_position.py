"""An explicit 2-D position for each image token after the connector (`model.connector_pos`).

Why: a grounding answer names grid coordinates, so the LLM must read *where* the patch it
attends to lies. After a LLaVA connector a token's position is only implicit (the ViT's
position embeddings, mixed through its blocks), and the LLM's RoPE is relative, so it sees
"how far back", not "which row and column". Adding an embedding of each patch's (row, col)
to the connector output makes position linearly readable from the attended token's value.

Modes:
- `none` (default): LLaVA's layout, nothing added (stock `LlavaForConditionalGeneration` export).
- `sincos2d`: fixed 2-D sin-cos (MAE's `get_2d_sincos_pos_embed`: half the channels encode the
  row, half the column, frequencies 1/10000^(2i/d)), times a learned scalar gain initialised
  to 1 (our choice: the LLM width and the connector's output scale vary; the gain lets
  training rebalance content and position). Not saved as weights apart from the gain.
- `learned`: one free vector per patch (std 0.02, the LLM embeddings' init), saved.

Choices written down:
- Positions are those of the model's square input (after `letterbox`/`pad`), the same square
  the 0-999 answer grid is defined on (`clocmllm.boxes`), so a patch's (row, col) and the
  grid numbers it should produce stay in step; padding patches get their positions too
  (they are ordinary patches of the square, and the LLM learns they hold no object).
- With `feature: cls_patch` the class token (index 0) gets no position: it has none.
- The stock LLaVA export cannot hold this (`save.stock_incompatibility`).
"""

from __future__ import annotations

import torch
from torch import nn

POSITION_MODES = ("none", "sincos2d", "learned")


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """[grid * grid, width] fixed embedding, row-major patch order (the ViT's)."""
    if width % 4:
        raise ValueError(f"model.connector_pos sincos2d needs an LLM width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class PatchPosition(nn.Module):
    """Adds a (row, col) embedding to the projected patch tokens [B, T, D]."""

    def __init__(self, mode: str, grid: int, width: int, has_cls: bool):
        super().__init__()
        if mode not in POSITION_MODES or mode == "none":
            raise ValueError(f"model.connector_pos must be one of {POSITION_MODES[1:]} here, got {mode!r}")
        self.mode, self.grid, self.has_cls = mode, grid, has_cls
        if mode == "sincos2d":
            self.register_buffer("table", sincos_2d(grid, width), persistent=False)
            self.gain = nn.Parameter(torch.ones(()))
        else:
            self.table = nn.Parameter(torch.randn(grid * grid, width) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.grid * self.grid
        if tokens.shape[1] != n + int(self.has_cls):
            raise ValueError(
                f"connector_pos: {tokens.shape[1]} image tokens for a {self.grid}x{self.grid} grid"
            )
        pos = self.table.to(tokens.dtype)
        if self.mode == "sincos2d":
            pos = pos * self.gain.to(tokens.dtype)
        if self.has_cls:
            pos = torch.cat([pos.new_zeros(1, pos.shape[1]), pos], dim=0)
        return tokens + pos[None]


def check_mode(mode: str) -> None:
    if mode not in POSITION_MODES:
        raise ValueError(f"model.connector_pos must be one of {POSITION_MODES}, got {mode!r}")
