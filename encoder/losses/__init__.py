"""CLOC losses, each a pure function of embeddings/boxes (jit- and grad-safe).

Conventions: embeddings are normalised inside; `logit_scale` is the raw log-space param;
`valid` masks are [B, M] bool; every loss returns a float32 scalar.
"""

from clocmllm.encoder.losses.contrastive import clip_softmax_loss, siglip_loss
from clocmllm.encoder.losses.grounding import grounding_loss
from clocmllm.encoder.losses.normalize import l2_normalize, temperature
from clocmllm.encoder.losses.region import region_text_loss
from clocmllm.encoder.losses.total import cloc_total, region_weight

__all__ = [
    "clip_softmax_loss",
    "cloc_total",
    "grounding_loss",
    "l2_normalize",
    "region_text_loss",
    "region_weight",
    "siglip_loss",
    "temperature",
]
