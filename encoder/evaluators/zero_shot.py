"""Zero-shot classification of region crops from class names (image-level CLIP ability).

The synthetic world has no image-level label, so we classify *objects*: each ground-truth
region is cropped from the original image, letterboxed like a training image, and its image
embedding is matched against the class-name prompts. The class of a region is its
`class_key` extra (the world writes `shape`); without it, the region's phrase. Class text
embeddings average the prompt templates (CLIP's prompt ensembling); the default templates
use only words a small word-level vocabulary has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from clocmllm.data.regions import RegionRecord
from clocmllm.encoder.evaluators.features import _jitted, embed_texts
from clocmllm.encoder.evaluators.retrieval import mean_class_accuracy, normalize
from clocmllm.encoder.preprocess import preprocess_image

TEMPLATES = ("{}", "a {}")


def region_classes(records: Sequence[RegionRecord], class_key: str = "shape") -> list[str]:
    """The class of every region (records order); `class_key` extra if all have it."""
    regs = [r for rec in records for r in rec.regions]
    if regs and all(class_key in r.extra for r in regs):
        return [str(r.extra[class_key]) for r in regs]
    return [r.text for r in regs]


def classify_crops(
    model,
    params,
    records: Sequence[RegionRecord],
    tokenize: Callable,
    class_key: str = "shape",
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 32,
    max_crops: int = 1000,
) -> dict[str, float]:
    """{'zero_shot_acc', 'zero_shot_macc'} over up to `max_crops` region crops."""
    labels = region_classes(records, class_key)
    classes = sorted(set(labels))
    if len(classes) < 2:
        return {}
    size = model.config.image_size
    crops, truth = [], []
    k = 0
    for rec in records:
        with Image.open(rec.image_path) as im:
            im = im.convert("RGB")
            for reg in rec.regions:
                if k < max_crops:
                    x1, y1, x2, y2 = reg.box
                    crop = im.crop(
                        (int(x1), int(y1), max(int(x1) + 1, int(round(x2))), max(int(y1) + 1, int(round(y2))))
                    )
                    crops.append(preprocess_image(crop, size)[0])
                    truth.append(labels[k])
                k += 1
    text = np.stack(
        [
            normalize(embed_texts(model, params, tokenize, [t.format(c) for t in templates])).mean(0)
            for c in classes
        ]
    )
    fn = _jitted(
        model, "encode_image", lambda: lambda p, x: model.apply({"params": p}, x, method="encode_image")
    )
    embs = []
    for i in range(0, len(crops), batch_size):
        chunk = crops[i : i + batch_size]
        x = np.zeros((batch_size, size, size, 3), np.float32)
        x[: len(chunk)] = np.stack(chunk)
        embs.append(np.asarray(fn(params, x))[: len(chunk)])
    sims = normalize(np.concatenate(embs)) @ normalize(text).T
    pred = [classes[j] for j in sims.argmax(1)]
    return {
        "zero_shot_acc": float(np.mean(np.asarray(pred) == np.asarray(truth))),
        "zero_shot_macc": mean_class_accuracy(pred, truth),
    }
