"""Zero-shot evaluation of an encoder checkpoint on a region-text eval split.

Metrics (all in [0, 1]; see each module for the protocol):
- image_text_{i2t,t2i}_r{1,5}: image<->caption retrieval over the eval set;
  `image_text_r1/_r5` average the two directions.
- region_retrieval_{r2t,t2r}_r{1,10}: our reading of CLOC's GRIT protocol: the pool is every
  ground-truth region of the eval set (boxes -> region embeddings) and their phrases.
  box->text: each region queries the distinct phrases of the pool; text->box: each region's
  phrase queries all regions of the pool; a retrieved item is a hit when its phrase equals the
  query's phrase. `region_retrieval_r1/_r10` average the two directions.
- region_cls_acc: region classification with ground-truth boxes, class = the region's phrase
  among all distinct phrases, mean accuracy over classes (mAcc, as the paper reports for
  COCO/LVIS); `region_cls_acc_inst` is the per-instance accuracy.
- zero_shot_acc / zero_shot_macc: class-name classification of region crops (zero_shot.py).
- image_text_chance_r{1,5}: the chance level of image_text_r{1,5} on this eval set (a random
  ranking's expected recall; repeated captions count as hits, so it is above k/N).
Region embeddings: prompter for `mode: cloc`, RoI-Align for `mode: clip` (features.py).

LCL checkpoints (`recipe: lcl`): LCL never trains the CLIP text tower or projections, so
their image-text figures would be chance by construction. For them `image_text_*` measure
LCL's own aligned pair instead: the pooled image latent z against the LM state at `<img>`
after reading the caption (lcl.py). The region and zero-shot metrics still use the CLIP
heads (near chance for LCL, by construction: LCL has no region or class-name objective).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from clocmllm.data.regions import RegionRecord
from clocmllm.encoder.evaluators.retrieval import (
    chance_recall_at_k,
    mean_class_accuracy,
    normalize,
    recall_at_k,
)


def evaluate_records(
    model,
    params,
    records: Sequence[RegionRecord],
    tokenize: Callable,
    mode: str = "cloc",
    batch_size: int = 32,
    zero_shot: bool = True,
    region_source: str | None = None,
    lcl: Mapping | None = None,
) -> dict[str, float]:
    """All metrics on `records`; `region_source` 'prompter'|'roi' overrides the mode's default.

    `lcl`: the run's `lcl:` config section when it is an LCL run (`recipe: lcl`); the
    image-text figures then come from LCL's z/LM-state heads (see the module docstring).
    """
    from clocmllm.encoder.evaluators.features import extract
    from clocmllm.encoder.evaluators.zero_shot import classify_crops

    source = region_source or ("prompter" if mode == "cloc" else "roi")
    f = extract(model, params, records, tokenize, "cloc" if source == "prompter" else "clip", batch_size)
    out: dict[str, float] = {}
    image_emb, caption_emb = f.image_emb, f.caption_emb
    if lcl is not None:
        from clocmllm.encoder.evaluators.lcl import lcl_embeddings

        image_emb, caption_emb = lcl_embeddings(model, params, records, tokenize, lcl, batch_size)
    i2t = recall_at_k(image_emb, caption_emb, f.captions, f.captions, (1, 5))
    t2i = recall_at_k(caption_emb, image_emb, f.captions, f.captions, (1, 5))
    chance = chance_recall_at_k(f.captions, f.captions, (1, 5))
    for k in (1, 5):
        out[f"image_text_i2t_r{k}"] = i2t[k]
        out[f"image_text_t2i_r{k}"] = t2i[k]
        out[f"image_text_r{k}"] = (i2t[k] + t2i[k]) / 2
        out[f"image_text_chance_r{k}"] = chance[k]
    if len(f.region_text):
        phrases = sorted(f.phrase_emb)
        phrase_mat = np.stack([f.phrase_emb[p] for p in phrases])
        query_text = np.stack([f.phrase_emb[t] for t in f.region_text])
        r2t = recall_at_k(f.region_emb, phrase_mat, f.region_text, phrases, (1, 10))
        t2r = recall_at_k(query_text, f.region_emb, f.region_text, f.region_text, (1, 10))
        for k in (1, 10):
            out[f"region_retrieval_r2t_r{k}"] = r2t[k]
            out[f"region_retrieval_t2r_r{k}"] = t2r[k]
            out[f"region_retrieval_r{k}"] = (r2t[k] + t2r[k]) / 2
        pred = [phrases[j] for j in (normalize(f.region_emb) @ normalize(phrase_mat).T).argmax(1)]
        out["region_cls_acc"] = mean_class_accuracy(pred, f.region_text)
        out["region_cls_acc_inst"] = float(
            np.mean(np.asarray(pred, object) == np.asarray(f.region_text, object))
        )
        out["num_regions"] = float(len(f.region_text))
        out["num_phrases"] = float(len(phrases))
    out["num_images"] = float(len(records))
    if zero_shot:
        out.update(classify_crops(model, params, records, tokenize, batch_size=batch_size))
    return out


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    split: str = "eval",
    max_images: int | None = None,
    batch_size: int = 32,
    region_source: str | None = None,
    zero_shot: bool = True,
) -> dict[str, float]:
    """Restore a checkpoint (workdir or checkpoints/<step>) and evaluate it on `data`."""
    from clocmllm.encoder.checkpoints import load_tokenizer, resolve_checkpoint, restore_params
    from clocmllm.encoder.config import ModelConfig
    from clocmllm.encoder.input_pipeline import load_records
    from clocmllm.encoder.models.clip import CLIP

    config, params, step = restore_params(checkpoint)
    model = CLIP(ModelConfig.from_dict(config["model"], source=f"{checkpoint}/config.yaml"))
    records = load_records(data, split)
    if max_images:
        records = records[:max_images]
    tokenize = load_tokenizer(config, resolve_checkpoint(checkpoint)[0]).encode_batch
    lcl = (config.get("lcl") or {}) if config.get("recipe") == "lcl" else None
    out = evaluate_records(
        model,
        params,
        records,
        tokenize,
        config.get("mode", "cloc"),
        batch_size,
        zero_shot,
        region_source,
        lcl=lcl,
    )
    out["step"] = float(step)
    return out
