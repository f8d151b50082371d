"""Vision-to-language connectors with LLaVA's names: `linear`, `mlp{N}x_gelu`, `identity`.

Built as `nn.Sequential` exactly as LLaVA's `build_vision_projector` does, so an `mlp2x_gelu`
connector has the parameter names `0.*` and `2.*` (LLaVA checkpoints' layout) and maps onto
`LlavaMultiModalProjector.linear_1/linear_2` one to one.
"""

from __future__ import annotations

import re

from torch import nn

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


def build_connector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"connector identity needs equal widths, got {in_dim} -> {out_dim}")
        return nn.Identity()
    match = _MLP_RE.match(kind)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"connector {kind!r}: depth must be >= 1")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown connector {kind!r}: use linear, identity or mlp<N>x_gelu")


def is_stock_llava_projector(kind: str) -> bool:
    """`LlavaMultiModalProjector` is exactly linear -> act -> linear."""
    return kind == "mlp2x_gelu"
