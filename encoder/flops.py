"""Model FLOPs of a CLIP / CLOC training step, counted from the config: the numerator of MFU.

Why count from the config: model FLOPs utilisation (MFU; Chowdhery et al. 2022, PaLM, App. B)
divides the FLOPs the *model* needs by the hardware's peak, so a run that recomputes
activations (`model.remat`) or does extra elementwise work is not credited for it. XLA's
`compiled.cost_analysis()["flops"]` counts what the program does instead; the two agree on
the matrix multiplies (tested). Convention: matmuls only, 2 FLOPs a multiply-add; the
backward costs twice the forward, so a step is 3x the forward. Attention counts the full
T x T scores for the causal text tower too (what the einsum computes). Rows that nobody
reads are not counted: a tower whose last block runs at its pooled row only (the text
tower always, the vision tower in the CLIP step) is counted that way, so MFU is not
credited with work the step skips. (Until session 8 both last blocks were counted in full:
+7.4% on the ViT-B/16 CLIP step; docs/benchmarks.md says which figures used which count.)
"""

from __future__ import annotations

from clocmllm.encoder.config import ModelConfig


def tower_forward_flops(
    batch: int, tokens: int, width: int, layers: int, mlp_dim: int, pooled: bool = False
) -> int:
    """Transformer stack: per layer the fused QKV and output projections (4 D^2 a token),
    the MLP (2 D F a token) and the two attention matmuls (2 T D a token). `pooled`: the
    last layer runs at one row a sequence (`Block.at_rows`): keys and values of all T
    tokens, the query, scores, output projection and MLP of that row."""
    per_token = 4 * width * width + 2 * width * mlp_dim + 2 * tokens * width
    if not pooled or not layers:
        return 2 * batch * layers * tokens * per_token
    last = 2 * tokens * width * width + 2 * width * width + 2 * width * mlp_dim + 2 * tokens * width
    return 2 * batch * ((layers - 1) * tokens * per_token + last)


def vision_forward_flops(cfg: ModelConfig, batch: int, pooled: bool = False) -> int:
    """Patch embedding + blocks + the image projection. `pooled`: the embedding alone
    (`VisionTower.embed`: the last block at the class token; the CLIP step), else all
    tokens (`tokens`, which CLOC's prompter reads)."""
    patch = 2 * batch * cfg.num_patches * (3 * cfg.patch_size**2) * cfg.vision_width
    blocks = tower_forward_flops(
        batch,
        cfg.num_image_tokens,
        cfg.vision_width,
        cfg.vision_layers,
        cfg.vision_mlp_dim,
        pooled=pooled and cfg.class_token,
    )
    return patch + blocks + 2 * batch * cfg.vision_width * cfg.embed_dim


def text_forward_flops(cfg: ModelConfig, batch: int, tokens: int | None = None) -> int:
    """Blocks, the last one at the EOT row (`TextTower`), + the text projection (the
    embedding lookup is a gather, 0 FLOPs)."""
    t = tokens or cfg.context_length
    blocks = tower_forward_flops(batch, t, cfg.text_width, cfg.text_layers, cfg.text_mlp_dim, pooled=True)
    return blocks + 2 * batch * cfg.text_width * cfg.embed_dim


def packed_text_forward_flops(cfg: ModelConfig, rows: int, width: int, pooled: int, first: bool) -> int:
    """The text tower over packed phrases (`TextTower.encode_packed`): `rows` x `width`
    tokens through the blocks, each attending over the W keys of its row (+1 for the
    shared first row when `first`), the last block at the `pooled` phrase rows only, the
    shared first row once through every block, and the projection of the pooled rows."""
    d, f, n = cfg.text_width, cfg.text_mlp_dim, cfg.text_layers
    if not n:
        return 2 * pooled * d * cfg.embed_dim
    keys = width + int(first)
    tokens = rows * width
    flops = 2 * (n - 1) * tokens * (4 * d * d + 2 * d * f + 2 * keys * d)
    flops += 2 * (tokens * 2 * d * d + pooled * (2 * d * d + 2 * d * f + 2 * keys * d))
    if first:  # one token, attending to itself
        flops += 2 * n * (4 * d * d + 2 * d * f + 2 * d)
    return flops + 2 * pooled * d * cfg.embed_dim


def absorb_prefix(seq: int, width: int, heads: int, queries: int) -> bool:
    """Whether prompts attend to a shared prefix more cheaply through the absorbed form.

    The plain form projects the S prefix tokens to keys and values (4 S D^2 FLOPs an image)
    and attends at head width (4 Q S D for Q query rows). The absorbed form never makes
    prefix keys or values: scores are (q_h Wk_h^T) . x, and the output (sum_k p x_k) Wv_h,
    the bias terms added exactly. It costs 4 Q D^2 for the two folds and 4 Q H S D to
    attend at full width in each head. The prompter has few query rows an image (3 M: two
    box corners and one text prompt a region) against S image tokens, so at one head the
    absorbed form is several times cheaper on the image side (tiny: ~3x, ViT-B/16: ~13x). Same result up to rounding.
    """
    plain = seq * width * width + queries * seq * width
    absorbed = queries * width * width + queries * heads * seq * width
    return absorbed < plain


def prompter_forward_flops(cfg: ModelConfig, batch: int, regions: int, absorbed: bool | None = None) -> int:
    """CLOC's prompter for `regions` box prompts (2 tokens) and as many text prompts (1 token)
    an image: one block over the prompt tokens, which attend to the image tokens and to their
    own prompt, plus the grounding head. The image side is the form the model runs
    (`absorb_prefix`): image keys/values once an image, or the absorbed
    form's two folds of the 3M query rows through Wk and Wv and full-width scores per head.
    `absorbed` forces one form (scripts/bench/bench_prompter.py counts both)."""
    d, s, h = cfg.vision_width, cfg.num_image_tokens, cfg.prompter_heads
    if absorbed is None:
        absorbed = absorb_prefix(s, d, h, 3 * regions)
    flops = 0 if absorbed else 2 * batch * s * 2 * d * d
    for p in (2, 1):  # box prompt, text prompt
        n = batch * regions * p
        flops += 2 * n * (4 * d * d + 2 * d * cfg.vision_mlp_dim)  # qkv, out, MLP
        flops += 2 * 2 * n * p * d  # scores and mix over its own prompt tokens
        flops += 2 * 2 * n * (h * s * d + d * d) if absorbed else 2 * 2 * n * s * d
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
    image_tokens: bool = False,
    packed: tuple[int, int, bool] | None = None,
    text_packed: tuple[int, int, bool] | None = None,
) -> int:
    """Model FLOPs of one training step (forward + backward) on `batch` image-text pairs.

    CLIP: `regions = 0`. CLOC: `regions` boxes an image and `phrases` region phrases of
    `phrase_tokens` tokens in the batch (B * M, or fewer when the trainer encodes each
    distinct phrase once). `packed` = (rows, width, shared first row): the phrases packed
    (encoder/text_packing.py), `phrases` of them pooled; `text_packed` the same for the
    `batch` captions. The contrastive logits (B x B x E)
    are counted; losses' elementwise work is not. The CLIP step runs the last vision block
    at the class token only; `image_tokens` counts it over every token, as CLOC (always) and
    HF's CLIPModel do.
    """
    pooled = not regions and not image_tokens
    fwd = vision_forward_flops(cfg, batch, pooled=pooled)
    if text_packed:
        fwd += packed_text_forward_flops(cfg, text_packed[0], text_packed[1], batch, text_packed[2])
    else:
        fwd += text_forward_flops(cfg, batch, text_tokens)
    fwd += 2 * batch * batch * cfg.embed_dim
    if regions:
        fwd += prompter_forward_flops(cfg, batch, regions)
        if packed:
            fwd += packed_text_forward_flops(cfg, packed[0], packed[1], phrases or batch * regions, packed[2])
        else:
            fwd += text_forward_flops(cfg, phrases or batch * regions, phrase_tokens or cfg.context_length)
        n = batch * regions
        fwd += 2 * n * n * cfg.embed_dim  # region-text logits
    return 3 * fwd


def batch_step_flops(cfg: ModelConfig, batch, image_tokens: bool = False) -> int:
    """`train_step_flops` for a host batch as the CLIP / CLOC step sees it: captions of their
    length, and the region phrases as encoded (distinct rows after `dedup_region_text`, at
    their trimmed length, or packed rows after `pack_region_phrases`). The global batch: divide by the device count for per-chip FLOPs."""
    if "text_pack_tokens" in batch:
        b, t = len(batch["text_pack_pool"]), None
        text = {"text_packed": (*batch["text_pack_tokens"].shape, "text_pack_sot" in batch)}
    else:
        (b, t), text = batch["text"].shape, {}
    if "region_valid" not in batch:
        return train_step_flops(cfg, b, text_tokens=t, image_tokens=image_tokens, **text)
    m = batch["region_valid"].shape[1]
    if "region_pack_tokens" in batch:
        rows, width = batch["region_pack_tokens"].shape
        first = "region_pack_sot" in batch
        n = len(batch["region_pack_pool"])
        return train_step_flops(cfg, b, t, regions=m, phrases=n, packed=(rows, width, first), **text)
    phrases = batch.get("region_phrases")
    if phrases is None:
        phrases = batch["region_text"].reshape(-1, batch["region_text"].shape[-1])
    n, pt = phrases.shape
    return train_step_flops(cfg, b, t, regions=m, phrases=n, phrase_tokens=pt, **text)


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
