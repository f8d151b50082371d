"""The micro encoder used by the JAX tests: one layer per tower, width 32 (compiles in seconds)."""

from __future__ import annotations

MICRO_MODEL = {
    "image_size": 32,
    "patch_size": 8,
    "vision_width": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "vision_mlp_dim": 64,
    "text_width": 32,
    "text_layers": 1,
    "text_heads": 2,
    "text_mlp_dim": 64,
    "embed_dim": 32,
    "context_length": 12,
    "prompter_freqs": 4,
}


def micro_model(**overrides) -> dict:
    """MICRO_MODEL with some fields changed (a fresh dict each call)."""
    return {**MICRO_MODEL, **overrides}
