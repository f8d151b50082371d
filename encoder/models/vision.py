"""ViT image tower, laid out 1:1 on Hugging Face `CLIPVisionModel` (+ `visual_projection`).

Class token at index 0, learned absolute position embedding, pre-layernorm before the
blocks (`pre_ln` = HF `pre_layrnorm`), post-layernorm on the class token only at pooling.
"""

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
    narrowing_linear,
    scaled_width_init,
)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width, no bias (HF `patch_embedding`, a Conv2d).

    The kernel is stored in nn.Conv's layout [p, p, 3, D] (param `kernel`), but applied
    as patchify + one matmul: identical result, and its gradient is a plain GEMM instead
    of a strided-convolution backward on XLA CPU.
    """

    patch_size: int
    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, 3, self.width))
        b, h, w, c = images.shape
        gh, gw = h // p, w // p
        x = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b * gh * gw, p * p * c).astype(self.dtype)  # 2-D: XLA CPU's fast GEMM path
        kernel = kernel.reshape(p * p * c, self.width).astype(self.dtype)
        # p*p*3 > width (tiny, ViT-S/16): the faster weight-gradient form on XLA CPU (`narrowing_linear`)
        y = narrowing_linear(x, kernel) if p * p * c > self.width else x @ kernel
        return y.reshape(b, gh * gw, self.width)


class VisionTower(nn.Module):
    """Params under `visual/`: patch_embed, class_embedding, pos_embed, pre_ln, layer_{i}, post_ln, proj."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        d = c.vision_width
        self.patch_embed = PatchEmbed(c.patch_size, d, dtype)
        if c.class_token:
            self.class_embedding = self.param("class_embedding", scaled_width_init(d), (d,))
        self.pos_embed = self.param("pos_embed", scaled_width_init(d), (c.num_image_tokens, d))
        self.pre_ln = LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype)
        block = block_class(c.remat)
        for i in range(c.vision_layers):
            setattr(self, f"layer_{i}", block(**block_kwargs(c, "vision")))
        self.post_ln = LayerNorm(epsilon=c.layer_norm_eps, dtype=dtype)
        self.proj = nn.Dense(c.embed_dim, use_bias=False, dtype=dtype, kernel_init=scaled_width_init(d))

    def tokens(
        self, images: jax.Array, return_hidden_states: bool = False
    ) -> jax.Array | tuple[jax.Array, ...]:
        """images [B, H, W, 3] -> tokens [B, 1+N, D] after the last block, before post_ln.

        With `return_hidden_states`, the tuple of L+1 states as HF returns them: [0] is the
        embedding after pre_ln, [i] the output of block i-1, [-1] == the tokens.
        """
        x = self._stem(images)
        states = [x]
        for i in range(self.config.vision_layers):
            x = getattr(self, f"layer_{i}")(x)
            states.append(x)
        return tuple(states) if return_hidden_states else x

    def pool(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, 1+N, D] -> image embedding [B, E]: post_ln(class token) @ proj, unnormalised."""
        return self._head(tokens[:, 0] if self.config.class_token else tokens.mean(axis=1))

    def embed(self, images: jax.Array) -> jax.Array:
        """images -> image embedding [B, E]: `pool(tokens(images))`, with the last block run
        at the class token only.

        Nothing reads the patch tokens' outputs of the last block when only the embedding is
        wanted (the CLIP objective, zero-shot evaluation): their keys and values are still
        needed, but not their queries, output projection or MLP (`Block.at_rows`, as the text
        tower pools at EOT). XLA does not prune these rows itself: the CLIP step ran the last
        block's MLP on all 65 `tiny` tokens and back-propagated zeros through it. Saves ~7%
        of a ViT-B/16 or ViT-S/16 tower's FLOPs and ~38% of the `tiny` tower's
        (`flops.vision_forward_flops`, pooled or not). CLOC's prompter reads
        every token, so the CLOC step keeps `tokens` + `pool`.
        """
        c = self.config
        if not c.class_token or c.vision_layers == 0:
            return self.pool(self.tokens(images))
        x = self._stem(images)
        for i in range(c.vision_layers - 1):
            x = getattr(self, f"layer_{i}")(x)
        last = getattr(self, f"layer_{c.vision_layers - 1}")
        return self._head(last.at_rows(x, jnp.zeros((x.shape[0],), jnp.int32)))

    def _head(self, pooled: jax.Array) -> jax.Array:
        """pooled [B, D] -> [B, E]: post_ln, then the projection, in float32."""
        return self.proj(self.post_ln(pooled)).astype(jnp.float32)

    def _stem(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> the first block's input: patches (+ class token) + positions, pre_ln."""
        c = self.config
        if images.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"images: expected [B, {c.image_size}, {c.image_size}, 3], got {images.shape}")
        x = self.patch_embed(images)
        if c.class_token:
            cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        return self.pre_ln(add_positions(x, self.pos_embed))
