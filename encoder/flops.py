"""Model FLOPs of a CLIP / CLOC training step, counted from the config: the numerator of MFU.

Why count from the config: model FLOPs utilisation (MFU; Chowdhery et al. 2022, PaLM, App. B)
divides the FLOPs the *model* needs by the hardware's peak, so a run that recomputes
activations (`model.remat`) or does extra elementwise work is not credited for it. XLA's
`compiled.cost_analysis()["flops"]` counts what the program does instead; the two agree on
the matrix multiplies (tested). Convention: matmuls only, 2 FLOPs a multiply-add; the
backward costs twice the forward, so a step is 3x the forward. Attention counts the full
T x T scores for the causal text tower too (what the einsum computes).
"""

from __future__ import annotations

from clocmllm.encoder.config import ModelConfig


def tower_forward_flops(batch: int, tokens: int, width: int, layers: int, mlp_dim: int) -> int:
    """Transformer stack: per layer the fused QKV and output projections (4 D^2 a token),
    the MLP (2 D F a token) and the two attention matmuls (2 T D a token)."""
    per_token = 4 * width * width + 2 * width * mlp_dim + 2 * tokens * width
    return 2 * batch * layers * tokens * per_token


def vision_forward_flops(cfg: ModelConfig, batch: int) -> int:
    """Patch embedding + blocks + the image projection."""
    patch = 2 * batch * cfg.num_patches * (3 * cfg.patch_size**2) * cfg.vision_width
    blocks = tower_forward_flops(
        batch, cfg.num_image_tokens, cfg.vision_width, cfg.vision_layers, cfg.vision_mlp_dim
    )
    return patch + blocks + 2 * batch * cfg.vision_width * cfg.embed_dim


def text_forward_flops(cfg: ModelConfig, batch: int, tokens: int | None = None) -> int:
    """Blocks + the text projection (the embedding lookup is a gather, 0 FLOPs)."""
    t = tokens or cfg.context_length
    blocks = tower_forward_flops(batch, t, cfg.text_width, cfg.text_layers, cfg.text_mlp_dim)
    return blocks + 2 * batch * cfg.text_width * cfg.embed_dim


def prompter_forward_flops(cfg: ModelConfig, batch: int, regions: int) -> int:
    """CLOC's prompter for `regions` box prompts (2 tokens) and as many text prompts (1 token)
    an image: image keys/values once an image, then one block over the prompt tokens, which
    attend to the image tokens and to their own prompt; plus the grounding head."""
    d, s = cfg.vision_width, cfg.num_image_tokens
    kv = 2 * batch * s * 2 * d * d
    flops = kv
    for p in (2, 1):  # box prompt, text prompt
        n = batch * regions * p
        flops += 2 * n * (4 * d * d + 2 * d * cfg.vision_mlp_dim) + 2 * 2 * n * (s + p) * d
    n = batch * regions
    flops += 2 * (2 * n) * (4 * cfg.prompter_freqs) * d  # two corners' sinusoids -> width
    flops += 2 * n * cfg.embed_dim * d + 2 * 2 * n * d * cfg.embed_dim  # text_in; proj of both
    return flops + 2 * n * (d * d + 4 * d)  # grounding head


def train_step_flops(
    cfg: ModelConfig,
    batch: int,
    text_tokens: int | None = None,
    regions: int = 0,
    phrases: int = 0,
    phrase_tokens: int = 0,
) -> int:
    """Model FLOPs of one training step (forward + backward) on `batch` image-text pairs.

    CLIP: `regions = 0`. CLOC: `regions` boxes an image and `phrases` region phrases of
    `phrase_tokens` tokens in the batch (B * M, or fewer when the trainer encodes each
    distinct phrase once). The contrastive logits (B x B x E) are counted; losses' elementwise
    work is not.
    """
    fwd = vision_forward_flops(cfg, batch) + text_forward_flops(cfg, batch, text_tokens)
    fwd += 2 * batch * batch * cfg.embed_dim
    if regions:
        fwd += prompter_forward_flops(cfg, batch, regions)
        fwd += text_forward_flops(cfg, phrases or batch * regions, phrase_tokens or cfg.context_length)
        n = batch * regions
        fwd += 2 * n * n * cfg.embed_dim  # region-text logits
    return 3 * fwd


def batch_step_flops(cfg: ModelConfig, batch) -> int:
    """`train_step_flops` for a host batch as the CLIP / CLOC step sees it: captions of their
    length, and the region phrases as encoded (distinct rows after `dedup_region_text`, at
    their trimmed length). The global batch: divide by the device count for per-chip FLOPs."""
    b, t = batch["text"].shape
    if "region_valid" not in batch:
        return train_step_flops(cfg, b, text_tokens=t)
    phrases = batch.get("region_phrases")
    if phrases is None:
        phrases = batch["region_text"].reshape(-1, batch["region_text"].shape[-1])
    m = batch["region_valid"].shape[1]
    return train_step_flops(cfg, b, t, regions=m, phrases=len(phrases), phrase_tokens=phrases.shape[-1])


# Dense bf16 peak of one chip, FLOP/s, by `jax.devices()[0].device_kind` prefix (vendor data sheets).
PEAK_BF16 = {
    "NVIDIA H100": 989e12,  # SXM; the PCIe card is 756e12 (pass --peak-tflops)
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The bf16 peak for a device kind, None when unknown (CPUs: pass it yourself)."""
    for prefix, peak in PEAK_BF16.items():
        if device_kind.startswith(prefix):
            return peak
    return None
