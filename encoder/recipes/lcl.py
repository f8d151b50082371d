"""LCL (Yang et al., NeurIPS 2024): vision-encoder pretraining from interleaved documents.

    L = λ · InfoNCE(z_i, h_i) + CE(next text token)        λ = 0.1 (LCL's code)

- z_i: the attentive pooler's latent of image i (models/lcl_lm.py);
- h_i: the causal LM's hidden state at image i's `<img>` token, i.e. after reading the
  text that precedes the image; contrasted over all images of the batch (both directions);
- CE: next-token cross-entropy where the TARGET is a text token. Image tokens, the
  `<img>`/`</img>` boundaries and padding are never targets; an image still conditions
  the text after it (captioning when the image comes first).
An image whose `<img>` sits at sequence position 0 has no preceding text: it is left out
of the contrastive term (neither anchor nor negative), but its tokens still feed the LM.

Sequence layout per document (ours): text segments are the tokenizer's ids with padding
stripped (CLIP framing `[sot] words [eot]` kept, so the eot separates segments); an image is
`<img>` + K placeholders + `</img>` with K = the ViT's token count (1+N). `<img>` and
`</img>` get ids V and V+1 after the text vocabulary V. A document is cut at `seq_len`:
text is truncated, an image block that does not fit (or would exceed `max_images` in the
batch) ends the document there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from clocmllm.data.interleaved import InterleavedDoc
from clocmllm.data.problems import ProblemLog
from clocmllm.encoder.config import ModelConfig, checked_fields
from clocmllm.encoder.input_pipeline import PipelineConfig
from clocmllm.encoder.losses import l2_normalize, temperature
from clocmllm.encoder.models.lcl_lm import LCLModel, LMConfig
from clocmllm.encoder.preprocess import preprocess_image

PARAM_KEY = "lcl"
LossFn = Callable[[dict, dict], tuple[jax.Array, dict]]


@dataclass(frozen=True)
class Config:
    """The `lcl:` section of a trainer recipe."""

    lam: float = 0.1
    seq_len: int = 256  # LM sequence length per document (<= lm.max_len)
    # Images per batch (a static shape: the vision tower runs on all slots, filled or not).
    # 0: batch size, right for paired data (one image a document); raise it for documents
    # with several images (an image that finds no slot ends its document).
    max_images: int = 0
    image_first_p: float = 0.5  # paired -> interleaved: image before its caption
    logit_scale_init: float = math.log(1 / 0.07)
    lm: LMConfig = field(default_factory=LMConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "<lcl>") -> Config:
        data = checked_fields(cls, data, source, "lcl")
        if "lm" in data:
            data["lm"] = LMConfig.from_dict(data["lm"], f"{source}: lm")
        cfg = cls(**data)
        if cfg.seq_len > cfg.lm.max_len:
            raise ValueError(f"{source}: seq_len {cfg.seq_len} exceeds lm.max_len {cfg.lm.max_len}")
        return cfg


# ====================================================================== token ids
@dataclass(frozen=True)
class SpecialIds:
    pad: int
    img_start: int
    img_end: int
    vocab_size: int  # LM vocabulary = text vocabulary + 2


def special_ids(model_config: ModelConfig) -> SpecialIds:
    v = model_config.vocab_size
    return SpecialIds(model_config.pad_token_id, v, v + 1, v + 2)


# ====================================================================== parameters
def lm_for(model_config: ModelConfig, cfg: Config) -> LCLModel:
    return LCLModel(cfg.lm, special_ids(model_config).vocab_size, cfg.logit_scale_init)


def init_extra_params(rng: jax.Array, model_config: ModelConfig, cfg: Config) -> dict:
    """The `lcl` params subtree (fresh): LM, image projection, pooler, contrastive heads."""
    k, dv = model_config.num_image_tokens, model_config.vision_width
    if cfg.seq_len < k + 3:
        raise ValueError(f"lcl.seq_len {cfg.seq_len} cannot hold one image block ({k} + 2 tokens) and text")
    tokens = jnp.zeros((1, k, dv), jnp.float32)
    ids = jnp.zeros((1, cfg.seq_len), jnp.int32)
    pos = jnp.full((1, cfg.seq_len), -1, jnp.int32)
    lm = lm_for(model_config, cfg)
    # jitted: XLA drops the dummy forward pass (only params are returned); eager init of the
    # LM dispatches hundreds of small ops and is several times slower on CPU.
    init = jax.jit(lambda r: lm.init(r, tokens, ids, pos, jnp.zeros((1,), jnp.int32))["params"])
    return init(rng)


def split_params(params: dict) -> tuple[dict, dict]:
    """{**clip, 'lcl': extra} -> (clip params, extra params)."""
    return {k: v for k, v in params.items() if k != PARAM_KEY}, params[PARAM_KEY]


# ====================================================================== losses
def masked_info_nce(a: jax.Array, b: jax.Array, valid: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE over the valid rows of a, b [I, C]; invalid rows are neither
    anchors nor negatives. 0 (finite grads) when nothing is valid."""
    a, b = l2_normalize(a), l2_normalize(b)
    v = valid.astype(bool)
    logits = temperature(logit_scale) * a @ b.T
    neg = jnp.finfo(jnp.float32).min
    n = jnp.maximum(v.sum(), 1)

    def one_way(lg):
        lg = jnp.where(v[None, :], lg, neg)
        logp = jax.nn.log_softmax(lg, axis=-1)
        return -jnp.sum(jnp.where(v, jnp.diagonal(logp), 0.0)) / n

    return 0.5 * (one_way(logits) + one_way(logits.T))


def next_token_loss(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean CE of predicting ids[:, t+1] at position t where mask[:, t]; 0 if none."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, :-1].astype(jnp.float32)
    return -jnp.sum(target * m) / jnp.maximum(m.sum(), 1.0)


def lcl_loss(params: dict, model: nn.Module, batch: dict, cfg: Config) -> tuple[jax.Array, dict]:
    """(λ·InfoNCE + CE, metrics) for a batch from `build_lcl_batch`; `model` is the CLIP."""
    clip_params, extra = split_params(params)
    tokens = model.apply({"params": clip_params}, batch["images"], method="encode_image_tokens")
    out = lm_for(model.config, cfg).apply(
        {"params": extra}, tokens, batch["lm_ids"], batch["lm_image_pos"], batch["image_start"]
    )
    ce = next_token_loss(out["logits"], batch["lm_ids"], batch["lm_loss_mask"])
    nce = masked_info_nce(out["z"], out["h"], batch["image_contrast"], out["scale"])
    loss = cfg.lam * nce + ce
    return loss, {
        "loss": loss,
        "lcl_lm_loss": ce,
        "lcl_contrastive_loss": nce,
        "lcl_logit_scale": jnp.exp(out["scale"]),
        "lcl_images_contrasted": batch["image_contrast"].astype(jnp.float32).sum(),
    }


def make_loss_fn(model: nn.Module, cfg: Config) -> LossFn:
    """loss_fn(params, batch) -> (loss, metrics), the trainer's loss signature."""

    def loss_fn(params: dict, batch: dict) -> tuple[jax.Array, dict]:
        return lcl_loss(params, model, batch, cfg)

    return loss_fn


# ====================================================================== batches (numpy side)
Item = tuple[str, Any]  # ("text", list[int]) or ("image", float32 [S, S, 3])


def build_lcl_batch(
    docs: Sequence[Sequence[Item]],
    seq_len: int,
    tokens_per_image: int,
    max_images: int,
    ids: SpecialIds,
    image_shape: tuple[int, int, int],
    shard: int = 0,
) -> dict[str, np.ndarray]:
    """Documents of items -> LM batch arrays (see the module docstring for the layout).

    lm_ids i32 [B, L]; lm_image_pos i32 [B, L] (i*K + k, or -1); lm_loss_mask bool [B, L]
    (position t is trained on target ids[t+1]); images f32 [I, S, S, 3]; image_valid [I];
    image_start i32 [I] (b*L + t of `<img>`); image_contrast [I] (valid and t > 0).

    `shard` = this host's index when each host builds its slice of a global batch of
    equal slices: flat indices are then offset (rows by shard*B, images by shard*I), so
    they index the assembled global arrays.
    """
    bsz, k = len(docs), tokens_per_image
    lm_ids = np.full((bsz, seq_len), ids.pad, np.int32)
    image_pos = np.full((bsz, seq_len), -1, np.int32)
    is_text = np.zeros((bsz, seq_len), bool)
    images = np.zeros((max_images, *image_shape), np.float32)
    image_valid = np.zeros((max_images,), bool)
    image_start = np.zeros((max_images,), np.int32)
    n_img = 0
    for b, doc in enumerate(docs):
        t = 0
        for kind, value in doc:
            if kind == "text":
                toks = list(value)[: seq_len - t]
                lm_ids[b, t : t + len(toks)] = toks
                is_text[b, t : t + len(toks)] = True
                t += len(toks)
                if t >= seq_len:
                    break
            elif kind == "image":
                if t + k + 2 > seq_len or n_img >= max_images:
                    break
                lm_ids[b, t] = ids.img_start
                lm_ids[b, t + k + 1] = ids.img_end
                image_pos[b, t + 1 : t + 1 + k] = (shard * max_images + n_img) * k + np.arange(k)
                images[n_img] = value
                image_valid[n_img] = True
                image_start[n_img] = (shard * bsz + b) * seq_len + t
                n_img += 1
                t += k + 2
            else:
                raise ValueError(f"unknown item kind {kind!r}")
    loss_mask = np.zeros((bsz, seq_len), bool)
    loss_mask[:, :-1] = is_text[:, 1:]
    contrast = image_valid & (image_start % seq_len > 0)
    return {
        "lm_ids": lm_ids,
        "lm_image_pos": image_pos,
        "lm_loss_mask": loss_mask,
        "images": images,
        "image_valid": image_valid,
        "image_start": image_start,
        "image_contrast": contrast,
    }


def tokenizer_encode(tok) -> Callable[[str], list[int]]:
    """A clocmllm Tokenizer -> text -> ids with padding stripped (framing kept)."""

    def encode(text: str) -> list[int]:
        row = tok.encode(text)
        eot = np.flatnonzero(row == tok.eot_token_id)
        end = int(eot[0]) + 1 if len(eot) else len(row)
        return [int(i) for i in row[:end]]

    return encode


class LCLDataset:
    """Interleaved documents -> LM batches; `batch(step)` is a pure function of (seed, step).

    Document order: epoch permutations default_rng([seed, epoch]) as in the region
    pipeline. An image that fails to decode is reported to `problems` (DataError if
    strict) and dropped from its document; the rest of the document stays. With several
    hosts each builds its slice (`process_index`) with global flat indices. `.cfg` is a
    `PipelineConfig`, so the trainer's `BatchIterator` prefetches it unchanged.
    """

    def __init__(
        self,
        docs: Sequence[InterleavedDoc],
        cfg: Config,
        model_config: ModelConfig,
        encode: Callable[[str], list[int]],
        batch_size: int,
        seed: int = 0,
        problems: ProblemLog | None = None,
        threads: int = 2,
        prefetch: int = 2,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not docs:
            raise ValueError("LCLDataset: no documents")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} not divisible by {process_count} hosts")
        self.docs = list(docs)
        self.lcl = cfg
        self.model_config = model_config
        self.encode = encode
        self.cfg = PipelineConfig(
            image_size=model_config.image_size,
            batch_size=batch_size,
            seed=seed,
            threads=threads,
            prefetch=prefetch,
        )
        self.problems = problems if problems is not None else ProblemLog()
        self.ids = special_ids(model_config)
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = batch_size // process_count
        self.max_images = (cfg.max_images or batch_size) // process_count
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.docs)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.docs))
        return self._perms[epoch]

    def _items(self, doc: InterleavedDoc) -> list[Item]:
        items: list[Item] = []
        for seg in doc.segments:
            if not seg.is_image:
                items.append(("text", self.encode(seg.text or "")))
                continue
            path = doc.image_path(seg)
            try:
                with Image.open(path) as im:
                    im.load()
                    pixels, _ = preprocess_image(im, self.cfg.image_size, self.cfg.mean, self.cfg.std)
                items.append(("image", pixels))
            except Exception as err:  # noqa: BLE001 - any decode failure is a data problem
                self.problems.add(path, None, "image", f"cannot decode image: {err}")
        return items

    def batch(self, step: int, pool: ThreadPoolExecutor | None = None) -> dict[str, np.ndarray]:
        """This host's slice of the global batch at `step` (keys as in `build_lcl_batch`)."""
        n, bsz = len(self.docs), self.cfg.batch_size
        first = self.process_index * self.local_batch
        picks = []
        for i in range(first, first + self.local_batch):
            epoch, slot = divmod(step * bsz + i, n)
            picks.append(self.docs[int(self._perm(epoch)[slot])])
        items = list(pool.map(self._items, picks)) if pool is not None else [self._items(d) for d in picks]
        s = self.cfg.image_size
        return build_lcl_batch(
            items,
            self.lcl.seq_len,
            self.model_config.num_image_tokens,
            self.max_images,
            self.ids,
            (s, s, 3),
            shard=self.process_index,
        )
