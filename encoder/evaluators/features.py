"""Embeddings of an eval set: images, captions, and every ground-truth region.

Region embeddings come from the prompter (box prompts) for CLOC checkpoints and from
RoI-Align pooling for plain CLIP ones (`mode: clip`): tokens -> post-layernorm (per token)
-> RoI-Align mean over the box -> the image projection. Applying the post-layernorm before
pooling puts every token in the space the projection was trained on (the class token's);
pooling raw tokens and normalising afterwards would mix unnormalised statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from clocmllm.data.regions import RegionRecord
from clocmllm.encoder.preprocess import boxes_to_unit, preprocess_image
from clocmllm.encoder.roi_align import roi_pool_tokens


@dataclass
class EvalFeatures:
    image_emb: np.ndarray  # [N, E]
    captions: list[str]
    caption_emb: np.ndarray  # [N, E]
    region_emb: np.ndarray  # [R, E], every region of every image
    region_text: list[str]  # [R]
    region_image: np.ndarray  # [R] image index of each region
    phrase_emb: dict[str, np.ndarray]  # distinct phrase -> text embedding


def _layernorm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, eps: float) -> jnp.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * scale + bias


def roi_region_embed(params: dict, config, tokens: jnp.ndarray, boxes: jnp.ndarray) -> jnp.ndarray:
    """RoI-Align region embeddings `[B, M, E]` of a plain CLIP (no prompter involved)."""
    v = params["visual"]
    normed = _layernorm(
        tokens.astype(jnp.float32), v["post_ln"]["scale"], v["post_ln"]["bias"], config.layer_norm_eps
    )
    pooled = roi_pool_tokens(normed, boxes, class_token=config.class_token)
    return pooled @ v["proj"]["kernel"]


_JITS: dict[tuple, Callable] = {}


def _jitted(model, name: str, make: Callable[[], Callable]) -> Callable:
    """One jitted function per (model instance, purpose): evaluation during training reuses
    its compiled code instead of recompiling at every eval."""
    key = (id(model), name)
    if key not in _JITS or _JITS[key][0] is not model:
        _JITS[key] = (model, jax.jit(make()))
    return _JITS[key][1]


def embed_texts(model, params, tokenize: Callable, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    fn = _jitted(model, "text", lambda: lambda p, t: model.apply({"params": p}, t, method="encode_text"))
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        pad = batch_size - len(chunk)
        ids = tokenize(chunk + [chunk[-1]] * pad)
        out.append(np.asarray(fn(params, ids))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


def _load(rec: RegionRecord, size: int):
    with Image.open(rec.image_path) as im:
        im.load()
        image, geom = preprocess_image(im, size)
    return image, boxes_to_unit([r.box for r in rec.regions], geom)


def extract(
    model, params, records: Sequence[RegionRecord], tokenize: Callable, mode: str, batch_size: int = 32
) -> EvalFeatures:
    """Run the encoder over `records` (letterboxed like training) and collect embeddings."""
    cfg = model.config
    rmax = max(1, max(len(r.regions) for r in records))

    def image_fwd(p, images, boxes):
        def fwd(m, images, boxes):
            tokens = m.encode_image_tokens(images)
            img = m.pool_image(tokens)
            if mode == "cloc":
                reg, _ = m.region_embed(tokens, boxes)
            else:
                reg = roi_region_embed(p, cfg, tokens, boxes)
            return img, reg

        return model.apply({"params": p}, images, boxes, method=fwd)

    image_fn = _jitted(model, f"image/{mode}", lambda: image_fwd)
    img_embs, reg_embs, reg_text, reg_img = [], [], [], []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(records), batch_size):
            chunk = list(records[start : start + batch_size])
            loaded = list(pool.map(lambda r: _load(r, cfg.image_size), chunk))
            n = len(chunk)
            images = np.zeros((batch_size, cfg.image_size, cfg.image_size, 3), np.float32)
            boxes = np.tile(np.asarray([0.0, 0.0, 1.0, 1.0], np.float32), (batch_size, rmax, 1))
            for i, (im, bx) in enumerate(loaded):
                images[i] = im
                boxes[i, : len(bx)] = bx
            img, reg = jax.device_get(image_fn(params, images, boxes))
            img_embs.append(img[:n])
            for i, rec in enumerate(chunk):
                k = len(rec.regions)
                reg_embs.append(reg[i, :k])
                reg_text += [r.text for r in rec.regions]
                reg_img += [start + i] * k
    captions = [r.caption for r in records]
    phrases = sorted(set(reg_text))
    phrase_vecs = embed_texts(model, params, tokenize, phrases)
    return EvalFeatures(
        image_emb=np.concatenate(img_embs),
        captions=captions,
        caption_emb=embed_texts(model, params, tokenize, captions),
        region_emb=np.concatenate(reg_embs) if reg_embs else np.zeros((0, cfg.embed_dim), np.float32),
        region_text=reg_text,
        region_image=np.asarray(reg_img, np.int64),
        phrase_emb=dict(zip(phrases, phrase_vecs, strict=True)),
    )
