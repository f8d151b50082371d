"""Causal text transformer, laid out 1:1 on Hugging Face `CLIPTextModel` (+ `text_projection`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clocmllm.encoder.config import ModelConfig
from clocmllm.encoder.models.transformer import (
    LayerNorm,
    add_positions,
    block_class,
    block_kwargs,
    normal,
    scaled_width_init,
)


def first_eot_index(token_ids: jax.Array, eot_token_id: int) -> jax.Array:
    """Index of the FIRST `eot_token_id` in each row [B, T] -> [B].

    A row without EOT (it was truncated by a tokenizer that does not keep EOT) pools at
    its last position, the only one that has attended to the whole row. HF would pool at
    0 there; our tokenizer always keeps EOT, so this differs only on malformed input.
    """
    is_eot = token_ids == eot_token_id
    first = jnp.argmax(is_eot, axis=-1)
    return jnp.where(is_eot.any(axis=-1), first, token_ids.shape[-1] - 1)


class TextTower(nn.Module):
    """Params under `text/`: token_embed, pos_embed, layer_{i}, final_ln, proj."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        d = c.text_width
        self.token_embed = nn.Embed(c.vocab_size, d, dtype=dtype, embedding_init=normal(0.02))
        self.pos_embed = self.param("pos_embed", normal(0.01), (c.context_length, d))
        block = block_class(c.remat)
        for i in range(c.text_layers):
            setattr(self, f"layer_{i}", block(**block_kwargs(c, "text")))
        self.final_ln = LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype)
        self.proj = nn.Dense(c.embed_dim, use_bias=False, dtype=dtype, kernel_init=scaled_width_init(d))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [B, T<=context_length] int32 -> text embedding [B, E], unnormalised."""
        c = self.config
        t = token_ids.shape[-1]
        if t > c.context_length:
            raise ValueError(f"token_ids: length {t} exceeds context_length {c.context_length}")
        # rows gathered from the float32 table, then cast: the table's gradient (a scatter-add
        # of every token's row gradient) then sums in float32, not in the compute dtype. In
        # bf16, 1000s of EOT / padding tokens summed into one row lost ~5% (test_encoder_models).
        table = self.token_embed.embedding
        x = add_positions(jnp.take(table, token_ids, axis=0).astype(jnp.dtype(c.dtype)), self.pos_embed[:t])
        n = c.text_layers
        for i in range(n - 1):
            x = getattr(self, f"layer_{i}")(x)
        idx = first_eot_index(token_ids, c.eot_token_id)
        # Only the EOT row is read: the last block's MLP and final_ln (both per token) run on
        # that row alone - the same numbers as HF's last_hidden_state[eot], less work.
        if n:
            pooled = getattr(self, f"layer_{n - 1}").at_rows(x, idx)
        else:
            pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return self.proj(self.final_ln(pooled)).astype(jnp.float32)

    def encode_packed(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segments: jax.Array,
        pool: jax.Array,
        first_token: jax.Array | None = None,
    ) -> jax.Array:
        """Sequences (phrases or captions) packed into rows (encoder/text_packing.py) -> their
        embeddings [N, E].

        tokens, positions, segments [R, W]; pool [N] flat index r * W + c of each sequence's
        pooled token; first_token [R] (all equal) or None: the id every sequence starts with,
        whose row is computed once and read by all as their first key. Equals `__call__` on
        the unpacked sequences (to rounding): a token reads the earlier tokens of its own
        segment only, at its own position within its sequence.
        """
        c = self.config
        dt = jnp.dtype(c.dtype)
        w = tokens.shape[-1]
        table = self.token_embed.embedding  # float32 gather, as in __call__
        pos = jnp.take(self.pos_embed, positions, axis=0)
        x = jnp.take(table, tokens, axis=0).astype(dt) + pos.astype(dt)
        causal = jnp.tril(jnp.ones((w, w), bool))
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal
        first = None
        if first_token is not None:  # position 0, the same for every sequence: one row
            first = (jnp.take(table, first_token[:1], axis=0) + self.pos_embed[:1]).astype(dt)  # [1, D]
        n = c.text_layers
        for i in range(n - 1):
            layer = getattr(self, f"layer_{i}")
            x, first = layer.packed(x, allowed, first), None if first is None else layer(first[None])[0]
        rows, cols = pool // w, pool % w
        if n:
            pooled = getattr(self, f"layer_{n - 1}").packed_at(x, allowed, rows, cols, first)
        else:
            pooled = x.reshape(-1, x.shape[-1])[pool]
        return self.proj(self.final_ln(pooled)).astype(jnp.float32)
