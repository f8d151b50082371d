"""Image-text retrieval of an LCL checkpoint through LCL's own heads.

LCL (encoder/recipes/lcl.py) trains the vision tower, its causal LM and the attentive pooler;
the CLIP text tower, `pool_image` and the CLIP projections stay at their random init. The
CLIP-head retrieval of such a checkpoint is chance by construction, so it says nothing about
what LCL learnt. What LCL's objective does align is the pooled image latent z with the LM's
state at `<img>` after reading the text that precedes the image; we evaluate that pair:

- image side: z_i = z_head(pooler(img_in(img_ln(encode_image_tokens(image_i)))));
- text side: h_j = h_head(LM state at `<img>`) for the document `[sot] caption_j [eot] <img>`
  (the text-first layout LCL trains on), read by the LM before any image token, so h_j
  depends on caption_j only (the LM is causal; the image block after `<img>` cannot leak).
Recall@k between {z_i} and {h_j} with text-match hits, as for the CLIP heads (retrieval.py).

Choice (ours): a caption longer than `seq_len - K - 2` tokens is cut to fit (its first
tokens kept, as the training batches cut text), so every eval image has its `<img>` slot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from clocmllm.data.regions import RegionRecord
from clocmllm.encoder.evaluators.features import _jitted, _load
from clocmllm.encoder.recipes import lcl


def lcl_embeddings(
    model,
    params: dict,
    records: Sequence[RegionRecord],
    tokenize: Callable,
    section: Mapping | None,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(z [N, C], h [N, C]): image latents and caption-conditioned LM states of `records`.

    `section` is the checkpoint's `lcl:` config section; `tokenize` the run's caption
    tokenizer (`encode_batch`), whose rows are cut after their first eot as in training.
    """
    cfg = lcl.Config.from_dict(dict(section) if section else None, source="checkpoint lcl:")
    mc = model.config
    k, size = mc.num_image_tokens, mc.image_size
    room = cfg.seq_len - k - 2
    ids = lcl.special_ids(mc)
    lm = lcl.lm_for(mc, cfg)

    def fwd(p, batch):
        clip_params, extra = lcl.split_params(p)
        tokens = model.apply({"params": clip_params}, batch["images"], method="encode_image_tokens")
        out = lm.apply(
            {"params": extra}, tokens, batch["lm_ids"], batch["lm_image_pos"], batch["image_start"]
        )
        return out["z"], out["h"]

    fn = _jitted(model, f"lcl/{cfg!r}", lambda: fwd)
    rows = np.asarray(tokenize([r.caption for r in records]))
    zs, hs = [], []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start : start + batch_size])
        docs = []
        for i, rec in enumerate(chunk):
            row = rows[start + i]
            eot = np.flatnonzero(row == mc.eot_token_id)
            text = [int(t) for t in row[: int(eot[0]) + 1 if len(eot) else len(row)]][:room]
            docs.append([("text", text), ("image", _load(rec, size)[0])])
        docs += [docs[-1]] * (batch_size - len(chunk))  # static shapes: one compile
        batch = lcl.build_lcl_batch(docs, cfg.seq_len, k, batch_size, ids, (size, size, 3))
        if not batch["image_contrast"].all():
            raise RuntimeError("LCL eval batch: an image lost its <img> slot")  # room guarantees it
        z, h = jax.device_get(fn(params, batch))
        zs.append(np.asarray(z)[: len(chunk)])
        hs.append(np.asarray(h)[: len(chunk)])
    return np.concatenate(zs), np.concatenate(hs)
