"""CLOC's grounding loss (paper Sec. 3, L_ground)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grounding_loss(pred: jax.Array, true: jax.Array, valid: jax.Array) -> jax.Array:
    """Squared error between boxes, averaged over 4 x (number of valid regions).

    pred, true [B, M, 4] normalised (x1, y1, x2, y2); valid [B, M] bool. The paper averages
    over 4·M·N (4 coordinates, M regions per image, N images): that is 4 x the number of
    regions when every image has M. With padding we divide by 4 x the regions that exist,
    so padded slots neither add error nor dilute the mean. 0 regions -> 0, finite grads.
    Padded `true` may hold anything (even NaN): it is masked with `where`, not multiplied.
    """
    v = valid.astype(bool)[..., None]
    diff = jnp.where(v, pred.astype(jnp.float32) - jnp.where(v, true, 0.0), 0.0)
    n = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    return jnp.sum(diff * diff) / (4.0 * n)
