"""RoI-Align over ViT patch tokens, in JAX: the region baseline for plain CLIP checkpoints.

CLOC's paper compares its prompter against RoI-Align pooling of the CLIP image features
and finds RoI-Align much worse; we keep it only to evaluate `mode: clip` checkpoints on the
region tasks. Conventions (those of torchvision's `roi_align(aligned=True)`):
- boxes come in [0, 1] of the padded square and are scaled to the `g x g` patch grid; the
  centre of patch cell `i` sits at continuous coordinate `i + 0.5`, so we subtract 0.5
  before sampling;
- each of the `out x out` bins averages `sampling x sampling` bilinear samples at evenly
  spaced points; samples beyond one cell outside the map are zero, others clamp to the edge.
The region feature is the mean over all bins (one vector per box).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bilinear(fmap: jnp.ndarray, y: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Sample `fmap [H, W, C]` at continuous (y, x) (cell centres at integers) -> [..., C]."""
    h, w = fmap.shape[:2]
    outside = (y < -1.0) | (y > h) | (x < -1.0) | (x > w)
    y = jnp.clip(y, 0.0, h - 1)
    x = jnp.clip(x, 0.0, w - 1)
    y0 = jnp.floor(y).astype(jnp.int32)
    x0 = jnp.floor(x).astype(jnp.int32)
    y1 = jnp.minimum(y0 + 1, h - 1)
    x1 = jnp.minimum(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    v = (
        (hy * hx)[..., None] * fmap[y0, x0]
        + (hy * lx)[..., None] * fmap[y0, x1]
        + (ly * hx)[..., None] * fmap[y1, x0]
        + (ly * lx)[..., None] * fmap[y1, x1]
    )
    return jnp.where(outside[..., None], 0.0, v)


def roi_align(fmap: jnp.ndarray, boxes: jnp.ndarray, out: int = 2, sampling: int = 2) -> jnp.ndarray:
    """`fmap [H, W, C]`, `boxes [M, 4]` unit (x1, y1, x2, y2) -> bins `[M, out, out, C]`."""
    h, w = fmap.shape[:2]
    x1 = boxes[:, 0] * w - 0.5
    y1 = boxes[:, 1] * h - 0.5
    x2 = boxes[:, 2] * w - 0.5
    y2 = boxes[:, 3] * h - 0.5
    bin_w = (x2 - x1) / out
    bin_h = (y2 - y1) / out
    # sample offsets inside the box, in units of bins: (bin + (s + 0.5) / sampling)
    t = (jnp.arange(out)[:, None] + (jnp.arange(sampling)[None, :] + 0.5) / sampling).reshape(-1)
    ys = y1[:, None] + t[None, :] * bin_h[:, None]  # [M, out*sampling]
    xs = x1[:, None] + t[None, :] * bin_w[:, None]
    yy = jnp.broadcast_to(ys[:, :, None], (ys.shape[0], ys.shape[1], xs.shape[1]))
    xx = jnp.broadcast_to(xs[:, None, :], yy.shape)
    v = bilinear(fmap, yy, xx)  # [M, out*s, out*s, C]
    m, c = v.shape[0], v.shape[-1]
    v = v.reshape(m, out, sampling, out, sampling, c)
    return v.mean(axis=(2, 4))


def roi_pool_tokens(
    tokens: jnp.ndarray, boxes: jnp.ndarray, class_token: bool = True, out: int = 2, sampling: int = 2
) -> jnp.ndarray:
    """ViT tokens `[B, 1+N, D]` + boxes `[B, M, 4]` (unit) -> region features `[B, M, D]`.

    Drops the class token, lays the N patch tokens on their `sqrt(N) x sqrt(N)` grid and
    averages the RoI-Align bins of each box.
    """
    patches = tokens[:, 1:] if class_token else tokens
    b, n, d = patches.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"roi_pool_tokens: {n} patch tokens do not form a square grid")
    fmaps = patches.reshape(b, g, g, d)
    bins = jax.vmap(lambda f, bx: roi_align(f, bx, out, sampling))(fmaps, boxes)
    return bins.mean(axis=(2, 3))
