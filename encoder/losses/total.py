"""CLOC's total loss L = L_clip + λ (L_region + L_ground) (paper Sec. 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def region_weight(valid: jax.Array) -> jax.Array:
    """λ = share of the batch's images that have at least one valid region ([B, M] -> scalar).

    The region losses are already means over valid regions; λ scales them down when only
    part of the batch carries region labels (e.g. image-text data mixed with region data).
    """
    return jnp.mean(jnp.any(valid.astype(bool), axis=-1).astype(jnp.float32))


def cloc_total(
    l_clip: jax.Array, l_region: jax.Array, l_ground: jax.Array, valid: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-> (L, metrics) with L = l_clip + λ(valid) (l_region + l_ground).

    metrics holds each term and λ (float32 scalars) for logging.
    """
    lam = region_weight(valid)
    total = l_clip + lam * (l_region + l_ground)
    return total, {
        "loss": total,
        "loss_clip": l_clip,
        "loss_region": l_region,
        "loss_ground": l_ground,
        "lambda": lam,
    }
