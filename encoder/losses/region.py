"""CLOC's region-text InfoNCE with text filtering (paper Sec. 3, L_region)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clocmllm.encoder.losses.normalize import l2_normalize, temperature

_MASKED = -1e9  # finite "minus infinity": keeps logsumexp and its gradient finite


def region_text_loss(
    region_emb: jax.Array,
    text_emb: jax.Array,
    valid: jax.Array,
    logit_scale: jax.Array,
    filter_threshold: float = 0.9,
) -> jax.Array:
    """Symmetric InfoNCE over all valid regions of the batch.

    region_emb, text_emb [B, M, E] (normalised here), valid [B, M] bool. The K = B*M slots
    are flattened; region k's positive is text k, its negatives are all other valid texts
    of the batch (other regions of the same image and of every other image), and
    symmetrically for texts. Text filtering: a negative j of anchor i is dropped from the
    denominator when cos(text_i, text_j) > `filter_threshold` (the same phrase, or a near
    synonym, is no negative); the mask is computed under stop_gradient, so no gradient
    flows through that similarity. Padded slots are neither anchors nor negatives.
    The loss is the mean over valid anchors of both directions, halved; with no valid
    region it is exactly 0 with zero (finite) gradients.
    """
    b, m, e = region_emb.shape
    r = l2_normalize(region_emb.reshape(b * m, e))
    t = l2_normalize(text_emb.reshape(b * m, e))
    v = valid.reshape(b * m).astype(bool)

    text_sim = jax.lax.stop_gradient(t @ t.T)
    eye = jnp.eye(b * m, dtype=bool)
    allowed = (v[None, :] & (text_sim <= filter_threshold)) | eye  # self always kept

    logits = temperature(logit_scale) * r @ t.T  # [regions, texts]
    pos = jnp.diagonal(logits)
    r2t = jax.nn.logsumexp(jnp.where(allowed, logits, _MASKED), axis=1) - pos
    # allowed is symmetric (text_sim is), so the same mask serves the text->region rows
    t2r = jax.nn.logsumexp(jnp.where(allowed, logits.T, _MASKED), axis=1) - pos
    w = v.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    return 0.5 * jnp.sum(w * (r2t + t2r)) / n
