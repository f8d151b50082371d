"""Image-text contrastive losses: CLIP's softmax InfoNCE and SigLIP's sigmoid loss.

Embeddings are normalised INSIDE the losses (callers pass the model's raw outputs), and
`logit_scale` is the raw log-space parameter (see `normalize.temperature`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clocmllm.encoder.losses.normalize import l2_normalize, temperature


def _soft_cross_entropy(logits: jax.Array, label_smoothing: float) -> jax.Array:
    """Mean over rows of CE against one-hot(diagonal) smoothed towards uniform."""
    n = logits.shape[-1]
    targets = jnp.eye(logits.shape[0], n, dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / n
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def clip_softmax_loss(
    img_emb: jax.Array, txt_emb: jax.Array, logit_scale: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Symmetric InfoNCE of CLIP: mean of image->text and text->image cross-entropies.

    img_emb, txt_emb [B, E] (normalised here); pair i is the positive of row/column i, the
    other B-1 in the batch are negatives. `label_smoothing` (clip-rocket uses 0.1) moves
    that much target mass uniformly over the B columns.
    """
    img = l2_normalize(img_emb)
    txt = l2_normalize(txt_emb)
    logits = temperature(logit_scale) * img @ txt.T
    return 0.5 * (
        _soft_cross_entropy(logits, label_smoothing) + _soft_cross_entropy(logits.T, label_smoothing)
    )


def siglip_loss(
    img_emb: jax.Array, txt_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> jax.Array:
    """SigLIP (Zhai et al. 2023): every (i, j) pair is a binary problem, label +1 iff i == j.

    loss = -(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), normalised by the batch size as
    in the paper (not by B^2), so its scale does not shrink with the batch. Here t =
    exp(logit_scale) is NOT clipped at 100 (SigLIP initialises t = 10, b = -10).
    """
    img = l2_normalize(img_emb)
    txt = l2_normalize(txt_emb)
    t = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    logits = t * img @ txt.T + jnp.asarray(logit_bias, jnp.float32)
    labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]
