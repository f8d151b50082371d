"""L2 normalisation that stays finite on all-zero rows (padded regions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| along the last axis in float32; a zero row stays zero (no NaN, finite grad)."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


def temperature(logit_scale: jax.Array, max_scale: float = 100.0) -> jax.Array:
    """exp(logit_scale) clipped at `max_scale`, as OpenAI CLIP clamps its learned scale.

    `logit_scale` is the raw log-space parameter (`params['logit_scale']`). Clipping the
    exponent instead of the param keeps the param itself untouched by the loss; its
    gradient is zero once the clip is active, which is what CLIP's clamp does too.
    """
    return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), jnp.log(max_scale)))
