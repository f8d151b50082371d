"""The CLOC model: CLIP two towers + prompter + grounding head, in Flax linen.

Why linen (not nnx): params are plain nested dicts, so the Hugging Face name table in
`clocmllm.adapters` is a flat dict mapping, orbax saves them directly,
`jax.eval_shape(model.init, ...)` sizes the big presets for free, and a sharding rule
is a function of each param's shape applied from outside (`clocmllm.encoder.sharding`).

Usage:
    model = CLIP(load_model_config("tiny"))
    variables = model.init(jax.random.key(0), *model.dummy_inputs(batch=1))
    tokens = model.apply(variables, images, method="encode_image_tokens")
    region_emb, feat = model.apply(variables, tokens, boxes, method="region_embed")

All embeddings are returned in float32 and unnormalised; normalise in the loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clocmllm.encoder.config import ModelConfig
from clocmllm.encoder.models.prompter import GroundingHead, Prompter
from clocmllm.encoder.models.text import TextTower
from clocmllm.encoder.models.vision import VisionTower

# XLA options for run-once programs (init): compile time matters more than run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class CLIP(nn.Module):
    """Top-level params: visual, text, prompter, ground, logit_scale, logit_bias."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.visual = VisionTower(c)
        self.text = TextTower(c)
        self.prompter = Prompter(c)
        self.ground_head = GroundingHead(c.vision_width, jnp.dtype(c.dtype), name="ground")
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), ())
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(c.logit_bias_init), ())

    # ------------------------------------------------------------------ image side
    def encode_image_tokens(
        self, images: jax.Array, return_hidden_states: bool = False
    ) -> jax.Array | tuple[jax.Array, ...]:
        """images [B, H, W, 3] normalised float -> tokens [B, 1+N, Dv] (HF last_hidden_state).

        `return_hidden_states=True` returns instead the tuple of L+1 hidden states exactly as
        HF (`[0]` after pre-layernorm, `[i]` output of block i-1, `[-1]` == the tokens).
        """
        return self.visual.tokens(images, return_hidden_states)

    def pool_image(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, 1+N, Dv] -> [B, E] (HF CLIPVisionModelWithProjection.image_embeds)."""
        return self.visual.pool(tokens)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images -> [B, E] unnormalised image embedding: `pool_image(encode_image_tokens(x))`,
        the last block computed at the class token only (`VisionTower.embed`)."""
        return self.visual.embed(images)

    # ------------------------------------------------------------------ text side
    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [B, T] int32 -> [B, E], pooled at the first EOT, unnormalised."""
        return self.text(token_ids)

    def encode_text_packed(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segments: jax.Array,
        pool: jax.Array,
        first_token: jax.Array | None = None,
    ) -> jax.Array:
        """Packed phrases or captions (encoder/text_packing.py) -> [N, E], as `encode_text`
        of each."""
        return self.text.encode_packed(tokens, positions, segments, pool, first_token)

    # ------------------------------------------------------------------ regions
    def region_embed(self, tokens: jax.Array, boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Box prompts: tokens [B, 1+N, Dv], boxes [B, M, 4] in [0, 1] of the padded square
        -> (emb [B, M, E] unnormalised, feat [B, M, Dv] input of the grounding head)."""
        return self.prompter.boxes(tokens, boxes)

    def text_prompt_embed(self, tokens: jax.Array, prompt_text_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Text prompts: tokens [B, 1+N, Dv], prompt_text_emb [B, M, E] (encode_text output)
        -> (emb [B, M, E], feat [B, M, Dv])."""
        return self.prompter.text(tokens, prompt_text_emb)

    def region_and_text_prompt_embed(
        self, tokens: jax.Array, boxes: jax.Array, prompt_text_emb: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """(`region_embed(tokens, boxes)`, `text_prompt_embed(tokens, prompt_text_emb)`), the
        image tokens' prompter keys/values computed once for both."""
        return self.prompter.boxes_and_text(tokens, boxes, prompt_text_emb)

    def ground(self, feat: jax.Array) -> jax.Array:
        """feat [B, M, Dv] -> boxes [B, M, 4] (x1, y1, x2, y2) in [0, 1]."""
        return self.ground_head(feat)

    # ------------------------------------------------------------------ init / plain CLIP
    def __call__(self, images: jax.Array, token_ids: jax.Array) -> dict[str, jax.Array]:
        """Image and text embeddings (and image tokens). During init also runs the prompter
        and grounding head once so that every parameter is created."""
        tokens = self.visual.tokens(images)
        out = {
            "image_emb": self.visual.pool(tokens),
            "text_emb": self.text(token_ids),
            "tokens": tokens,
        }
        if self.is_initializing():
            b = images.shape[0]
            boxes = jnp.broadcast_to(jnp.asarray([0.25, 0.25, 0.75, 0.75], jnp.float32), (b, 1, 4))
            _, feat = self.prompter.boxes(tokens, boxes)
            self.prompter.text(tokens, out["text_emb"][:, None, :])
            self.ground_head(feat)
        return out

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        """Zero images and token rows (ending in EOT) of the configured sizes, for init."""
        c = self.config
        images = jnp.zeros((batch, c.image_size, c.image_size, 3), jnp.float32)
        ids = jnp.full((batch, c.context_length), c.pad_token_id, jnp.int32)
        ids = ids.at[:, 0].set(c.eot_token_id)
        return images, ids


def init_params(config: ModelConfig, rng: jax.Array | int = 0) -> dict:
    """Fresh `params` dict (float32) for `config`."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    model = CLIP(config)
    # One jit instead of op-by-op dispatch, compiled without LLVM optimisation: init runs
    # once, and the optimised compile of all those RNG calls costs 3x more than it saves.
    init = jax.jit(model.init, compiler_options=FAST_COMPILE)
    return init(rng, *model.dummy_inputs(1))["params"]


def param_shapes(config: ModelConfig) -> dict:
    """Param tree of ShapeDtypeStructs without allocating (jax.eval_shape)."""
    model = CLIP(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs(1)))["params"]
