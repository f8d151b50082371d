"""LCL's model pieces (Yang et al., NeurIPS 2024): a causal LM over interleaved sequences and
an attentive pooler, both on top of the vision encoder's image tokens.

The vision tower's tokens [I, K, Dv] are projected to the LM width once (`img_ln`, `img_in`);
the same projected tokens
- are compressed by the attentive pooler (one learned query, cross-attention) into z, and
- replace the placeholder positions between `<img>` and `</img>` in the LM's input.
The LM's hidden state at an image's `<img>` token has read all the text before the image;
LCL contrasts it with z (`z_head`, `h_head` project both to `contrast_dim`).

Choices (ours; the paper's code is not bound by CLOC's contract):
- The projection starts with a LayerNorm: CLOC's tokens are taken before the ViT's
  post-layernorm (the contract's `encode_image_tokens`), so their scale drifts in training.
- The LM reuses CLOC's pre-norm transformer block (causal), learned absolute positions,
  exact GELU, a final LayerNorm and an untied output head; it is trained from scratch.
- The pooler's query attends over the K projected tokens with `pooler_heads` heads,
  followed by a LayerNorm (stable scale for the contrastive head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clocmllm.encoder.config import checked_fields
from clocmllm.encoder.models.transformer import Block, normal


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the LCL language model (the `lcl.lm:` section of a recipe)."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_dim: int = 1024
    max_len: int = 256
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    pooler_heads: int = 4
    contrast_dim: int = 0  # 0: width

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "<lm>") -> LMConfig:
        data = checked_fields(cls, data, source, "LM")
        cfg = cls(**data)
        for name, heads in (("heads", cfg.heads), ("pooler_heads", cfg.pooler_heads)):
            if heads <= 0 or cfg.width % heads:
                raise ValueError(f"{source}: {name}={heads} does not divide width {cfg.width}")
        return cfg


class AttentivePooler(nn.Module):
    """One learned query cross-attends over tokens [I, K, D] -> [I, D] (params query, attn, ln)."""

    width: int
    heads: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        query = self.param("query", normal(0.02), (1, self.width))
        q = jnp.broadcast_to(query, (tokens.shape[0], 1, self.width))
        out = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.width, out_features=self.width, name="attn"
        )(q, tokens)
        return nn.LayerNorm(epsilon=self.eps, name="ln")(out[:, 0])


class LCLModel(nn.Module):
    """Params: img_ln, img_in, pooler, token_embed, pos_embed, layer_{i}, final_ln, lm_head,
    z_head, h_head, logit_scale."""

    cfg: LMConfig
    vocab_size: int  # text vocabulary + the two image boundary tokens
    logit_scale_init: float = 2.6592600369644165  # log(1/0.07)

    def setup(self) -> None:
        c = self.cfg
        self.img_ln = nn.LayerNorm(epsilon=c.layer_norm_eps)
        self.img_in = nn.Dense(c.width)
        self.pooler = AttentivePooler(c.width, c.pooler_heads, c.layer_norm_eps)
        self.token_embed = nn.Embed(self.vocab_size, c.width, embedding_init=normal(0.02))
        self.pos_embed = self.param("pos_embed", normal(0.01), (c.max_len, c.width))
        for i in range(c.layers):
            setattr(
                self,
                f"layer_{i}",
                Block(c.width, c.heads, c.mlp_dim, c.hidden_act, c.layer_norm_eps, c.layers, causal=True),
            )
        self.final_ln = nn.LayerNorm(epsilon=c.layer_norm_eps)
        self.lm_head = nn.Dense(self.vocab_size)
        d = c.contrast_dim or c.width
        self.z_head = nn.Dense(d, use_bias=False)
        self.h_head = nn.Dense(d, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())

    def __call__(
        self, image_tokens: jax.Array, ids: jax.Array, image_pos: jax.Array, image_start: jax.Array
    ) -> dict[str, jax.Array]:
        """image_tokens [I, K, Dv] (vision tower output), ids [B, L] int32, image_pos [B, L]
        (flat index i*K + k of the image token that fills a position, -1 for text/pad),
        image_start [I] (flat index b*L + t of each image's `<img>` token)
        -> dict(z [I, C], h [I, C] (LM state at `<img>`), logits [B, L, V], scale []).
        """
        c = self.cfg
        b, t = ids.shape
        if t > c.max_len:
            raise ValueError(f"lm_ids: length {t} exceeds LM max_len {c.max_len}")
        proj = self.img_in(self.img_ln(image_tokens.astype(jnp.float32)))  # [I, K, D]
        z = self.z_head(self.pooler(proj))
        flat = proj.reshape(-1, c.width)
        x = self.token_embed(ids)
        from_image = jnp.take(flat, jnp.maximum(image_pos, 0), axis=0)
        x = jnp.where((image_pos >= 0)[..., None], from_image, x) + self.pos_embed[:t]
        for i in range(c.layers):
            x = getattr(self, f"layer_{i}")(x)
        x = self.final_ln(x)
        h = self.h_head(jnp.take(x.reshape(b * t, c.width), image_start, axis=0))
        return {"z": z, "h": h, "logits": self.lm_head(x), "scale": self.logit_scale}
