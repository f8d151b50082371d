"""CLOC's prompter (box or text prompt -> region embedding) and its grounding head.

Choices where the paper (arXiv 2410.02746, Sec. 3) is silent, ours:
- Box encoding: each corner (x, y) in [0, 1] of the padded square becomes
  [sin(2 pi f x), cos(2 pi f x), sin(2 pi f y), cos(2 pi f y)] for `prompter_freqs`
  frequencies f geometrically spaced from 1 to 2 * grid_size cycles per side (the finest
  period is half a patch, so a corner is located below patch resolution), -> Dense to the
  ViT width, + a learned corner-type embedding (top-left vs bottom-right), so the block can
  tell the two corners apart after attention mixes them.
- Pooling: mean over the prompt tokens' outputs only. The paper says "global average"
  without saying over which tokens; averaging over 1+N+P tokens would dilute the region
  signal by the N image tokens that are the same for every region of an image.
- Independence: each (image, prompt) pair is its own sequence [image tokens ; prompt
  tokens], so padded regions cannot change valid ones. We compute it without copying the
  image tokens M times: only prompt positions are pooled, so only their outputs are
  computed (`Block.with_prefix`). The image tokens are normalised once per image and never
  projected to keys and values: each prompt query is folded through Wk instead, and its
  mix of image tokens through Wv (`flops.absorb_prefix`: at one head ~3x fewer FLOPs
  on the image side at `tiny`, ~13x at B/16; the prompter's fwd+bwd ran 1.11-1.22x faster
  at tiny and 1.48-1.50x at ViT-S/16 batch 32 on one CPU thread, scripts/bench/bench_prompter.py).
- Grounding head: fc1 (D->D), exact GELU, fc2 (D->4), sigmoid: boxes in [0, 1].
- Box mask (`prompter_box_mask`, ours, off by default = the paper's prompter): a box prompt
  attends only to the class token, its own prompt tokens and the patches its box overlaps
  (an additive -1e9 bias on the other image keys, as Mask2Former's masked attention). Why:
  the unmasked prompter has to learn to match its sinusoid box code against the ViT's
  position embeddings before any region signal reaches the right tokens, and on the demo's
  tiny model it hardly did: after 1500 steps 17% of its attention on image patches fell on
  the patches inside the box, where uniform attention gives 8%, so a region embedding
  carried the box's size and the image's colours, not the object (region R@1 0.19). With
  the mask the region feature is local from step 0, like RoI-Align's for the CLIP
  baseline: region R@1 0.68 at the same budget (docs/pretraining.md). Text prompts are
  never masked (they have no box).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clocmllm.encoder.config import ModelConfig
from clocmllm.encoder.models.transformer import Block, LayerNorm, block_kwargs, normal, scaled_width_init


def box_frequencies(config: ModelConfig) -> np.ndarray:
    """Cycles per unit side for the sinusoid box encoding (see module docstring)."""
    return np.geomspace(1.0, max(2.0, 2.0 * config.grid_size), config.prompter_freqs)


def corner_features(boxes: jax.Array, freqs: np.ndarray) -> jax.Array:
    """boxes [..., 4] (x1, y1, x2, y2) in [0, 1] -> [..., 2, 4F] sinusoid features per corner."""
    corners = boxes.reshape(*boxes.shape[:-1], 2, 2)  # [..., corner, (x, y)]
    angles = 2 * jnp.pi * corners[..., None] * jnp.asarray(freqs, jnp.float32)  # [..., 2, 2, F]
    feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., 2, 2, 2F]
    return feats.reshape(*feats.shape[:-2], -1)


MASKED = -1e9  # finite: exp underflows to exactly 0 without inf arithmetic


def box_attention_bias(boxes: jax.Array, grid: int, leading: int) -> jax.Array:
    """boxes [B, M, 4] in [0, 1] -> additive attention bias [B, M, leading + grid**2] on the
    image tokens: 0 for the `leading` (class) tokens and for every patch whose cell overlaps
    the box with positive area, MASKED for the others."""
    edges = jnp.arange(grid, dtype=jnp.float32) / grid
    x1, y1, x2, y2 = (boxes[..., i, None].astype(jnp.float32) for i in range(4))
    cols = (x1 < edges + 1.0 / grid) & (x2 > edges)  # [B, M, G]
    rows = (y1 < edges + 1.0 / grid) & (y2 > edges)
    inside = (rows[..., :, None] & cols[..., None, :]).reshape(*boxes.shape[:-1], grid * grid)
    lead = jnp.ones((*boxes.shape[:-1], leading), bool)
    return jnp.where(jnp.concatenate([lead, inside], axis=-1), 0.0, MASKED)


class BoxEmbed(nn.Module):
    """Params `dense/{kernel,bias}` (4F -> D) and `corner_embed` [2, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, boxes: jax.Array) -> jax.Array:
        c = self.config
        d = c.vision_width
        feats = corner_features(boxes.astype(jnp.float32), box_frequencies(c))
        x = nn.Dense(d, dtype=jnp.dtype(c.dtype), name="dense")(feats)
        corner = self.param("corner_embed", normal(0.02), (2, d))
        return x + corner.astype(x.dtype)


class Prompter(nn.Module):
    """Params under `prompter/`: box_embed, text_in, layer, ln, proj."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.box_embed = BoxEmbed(c)
        self.text_in = nn.Dense(c.vision_width, dtype=dtype)
        self.layer = Block(**block_kwargs(c, "prompter"))
        self.ln = LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype)
        self.proj = nn.Dense(
            c.embed_dim, use_bias=False, dtype=dtype, kernel_init=scaled_width_init(c.vision_width)
        )

    def boxes(self, tokens: jax.Array, boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens [B, S, D], boxes [B, M, 4] in [0, 1] -> (emb [B, M, E], feat [B, M, D])."""
        return self._pool(tokens, self.box_embed(boxes), bias=self._box_bias(boxes, tokens.shape[1]))

    def text(self, tokens: jax.Array, text_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens [B, S, D], text_emb [B, M, E] -> (emb [B, M, E], feat [B, M, D])."""
        prompt = self.text_in(text_emb.astype(jnp.dtype(self.config.dtype)))
        return self._pool(tokens, prompt[:, :, None, :])

    def boxes_and_text(
        self, tokens: jax.Array, boxes: jax.Array, text_emb: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """`boxes(tokens, boxes)` and `text(tokens, text_emb)` with the image tokens' keys and
        values computed once for both (the CLOC step needs both prompt kinds per image)."""
        m = boxes.shape[1]
        cache = self.layer.prefix_cache(tokens.astype(jnp.dtype(self.config.dtype)), queries=3 * m)
        prompt = self.text_in(text_emb.astype(jnp.dtype(self.config.dtype)))
        box_out = self._pool(tokens, self.box_embed(boxes), cache, self._box_bias(boxes, tokens.shape[1]))
        return box_out, self._pool(tokens, prompt[:, :, None, :], cache)

    def _box_bias(self, boxes: jax.Array, seq: int) -> jax.Array | None:
        c = self.config
        if not c.prompter_box_mask:
            return None
        return box_attention_bias(boxes, c.grid_size, seq - c.grid_size**2)

    def _pool(
        self, tokens: jax.Array, prompts: jax.Array, cache=None, bias=None
    ) -> tuple[jax.Array, jax.Array]:
        tokens = tokens.astype(prompts.dtype)
        out = self.layer.with_prefix(prompts, tokens, cache=cache, bias=bias)  # [B, M, P, D]
        feat = self.ln(out.mean(axis=2))
        return self.proj(feat).astype(jnp.float32), feat.astype(jnp.float32)


class GroundingHead(nn.Module):
    """Params `fc1` (D->D) and `fc2` (D->4); sigmoid output (x1, y1, x2, y2) in [0, 1]."""

    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, feat: jax.Array) -> jax.Array:
        x = nn.Dense(self.width, dtype=self.dtype, name="fc1")(feat.astype(self.dtype))
        x = jax.nn.gelu(x, approximate=False)
        x = nn.Dense(4, dtype=self.dtype, name="fc2")(x)
        return jax.nn.sigmoid(x.astype(jnp.float32))
