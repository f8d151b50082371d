"""clip-rocket (Fini et al., TMLR 2023): strong image views + augmented captions, own projector.

Loss, per batch of b images with n strong views each:
    L = (L_global + n * L_aug) / (1 + n)
- L_global: the trainer's loss on the weak view (CLIP InfoNCE, or CLOC's full loss);
- L_aug = mean over views j of InfoNCE(P_img(image_j), P_txt(caption_j)) with label
  smoothing 0.1, through a separate 2-layer GELU MLP projector per modality and its own
  learned temperature; caption_j is an EDA-augmented caption (caption_augment.py);
- with `region_on_strong`, each view also adds CLOC's λ·(L_region + L_ground) on its own
  boxes, which followed the crop and flip (augment.py).

Choices (ours, where the paper or CLOC's contract leave it open):
- The projector's input is the CLIP embedding (`pool_image` / `encode_text` output, E).
  clip-rocket feeds backbone features; the contract exposes the embedding only, and the
  separate MLP still keeps strong-augmentation invariance out of the global space.
  Width: hidden = 4·E, output = E (`projector_hidden`/`projector_dim` override).
- Each view's InfoNCE contrasts the b pairs of that view (negatives = the other images'
  view j), as multi-crop CLIP does; views are not mixed inside one softmax.
- Region terms on strong views use the model's main logit_scale and prompter: regions
  live in the same space as on the weak view.
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

from clocmllm.encoder.augment import StrongAugment, strong_view, unit_to_pixel_boxes
from clocmllm.encoder.caption_augment import CaptionAugment
from clocmllm.encoder.config import ModelConfig, checked_fields
from clocmllm.encoder.losses import clip_softmax_loss, grounding_loss, region_text_loss, region_weight
from clocmllm.encoder.preprocess import normalize

PARAM_KEY = "rocket"
LossFn = Callable[[dict, dict], tuple[jax.Array, dict]]


@dataclass(frozen=True)
class Config:
    """The `rocket:` section of a trainer recipe."""

    num_views: int = 2
    label_smoothing: float = 0.1
    projector_hidden: int = 0  # 0: 4 * embed_dim
    projector_dim: int = 0  # 0: embed_dim
    logit_scale_init: float = math.log(1 / 0.07)
    region_on_strong: bool = True  # CLOC region+ground terms per strong view; false with `mode: clip`
    text_filter: float = 0.9
    augment: StrongAugment = field(default_factory=StrongAugment)
    caption: CaptionAugment = field(default_factory=CaptionAugment)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "<rocket>") -> Config:
        data = checked_fields(cls, data, source, "rocket")
        if "augment" in data:
            data["augment"] = StrongAugment.from_dict(data["augment"], f"{source}: augment")
        if "caption" in data:
            cap = dict(data["caption"] or {})
            if "ops" in cap:
                cap["ops"] = tuple(cap["ops"])
            try:
                data["caption"] = CaptionAugment(**cap)
            except TypeError as err:
                raise ValueError(f"{source}: caption: {err}") from None
        cfg = cls(**data)
        if cfg.num_views < 1:
            raise ValueError(f"{source}: num_views must be >= 1, got {cfg.num_views}")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(f"{source}: label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        return cfg


# ====================================================================== parameters
class MLPProjector(nn.Module):
    """fc1 -> exact GELU -> fc2 (params `fc1`, `fc2`)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden, name="fc1")(x.astype(jnp.float32))
        x = jax.nn.gelu(x, approximate=False)
        return nn.Dense(self.out, name="fc2")(x)


class RocketHead(nn.Module):
    """Params: image/{fc1,fc2}, text/{fc1,fc2}, logit_scale (log space, like CLIP's)."""

    hidden: int
    out: int
    logit_scale_init: float

    def setup(self) -> None:
        self.image = MLPProjector(self.hidden, self.out)
        self.text = MLPProjector(self.hidden, self.out)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())

    def __call__(self, img: jax.Array, txt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.image(img), self.text(txt), self.logit_scale


def head_for(model_config: ModelConfig, cfg: Config) -> RocketHead:
    e = model_config.embed_dim
    return RocketHead(cfg.projector_hidden or 4 * e, cfg.projector_dim or e, cfg.logit_scale_init)


def init_extra_params(rng: jax.Array, model_config: ModelConfig, cfg: Config) -> dict:
    """The `rocket` params subtree (fresh)."""
    e = model_config.embed_dim
    dummy = jnp.zeros((1, e), jnp.float32)
    return head_for(model_config, cfg).init(rng, dummy, dummy)["params"]


def split_params(params: dict) -> tuple[dict, dict]:
    """{**clip, 'rocket': extra} -> (clip params, extra params)."""
    clip = {k: v for k, v in params.items() if k != PARAM_KEY}
    return clip, params[PARAM_KEY]


# ====================================================================== loss
def augmented_loss(params: dict, model: nn.Module, batch: dict, cfg: Config) -> tuple[jax.Array, dict]:
    """Mean over the n strong views of the per-view augmented term (see module docstring)."""
    clip_params, extra = split_params(params)
    b, n = batch["aug_images"].shape[:2]
    images = batch["aug_images"].reshape(b * n, *batch["aug_images"].shape[2:])
    aug_text = batch["aug_text"].reshape(b * n, -1)
    want_regions = cfg.region_on_strong and "aug_region_boxes" in batch

    def forward(m, images, aug_text):
        if not want_regions:  # the embedding alone: the last vision block at the class token only
            return {"img": m.encode_image(images), "txt": m.encode_text(aug_text)}
        tokens = m.encode_image_tokens(images)
        out = {"img": m.pool_image(tokens)}
        bm, mm, t = batch["region_text"].shape
        phrases = batch["region_text"].reshape(bm * mm, t)
        if t == aug_text.shape[-1]:  # one text-tower pass for captions and phrases
            emb = m.encode_text(jnp.concatenate([aug_text, phrases], axis=0))
            out["txt"], rtext = emb[: b * n], emb[b * n :]
        else:  # phrases tokenized with a shorter context (input pipeline option)
            out["txt"], rtext = m.encode_text(aug_text), m.encode_text(phrases)
        rtext = rtext.reshape(bm, 1, mm, -1)
        rtext = jnp.broadcast_to(rtext, (bm, n, mm, rtext.shape[-1])).reshape(bm * n, mm, -1)
        boxes = batch["aug_region_boxes"].reshape(b * n, mm, 4)
        out["region_emb"], _ = m.region_embed(tokens, boxes)
        _, feat = m.text_prompt_embed(tokens, rtext)
        out["pred_boxes"] = m.ground(feat)
        out["region_text_emb"] = rtext
        return out

    model_cfg = model.config
    out = model.apply({"params": clip_params}, images, aug_text, method=forward)
    zi, zt, scale = head_for(model_cfg, cfg).apply({"params": extra}, out["img"], out["txt"])
    zi = zi.reshape(b, n, -1).swapaxes(0, 1)
    zt = zt.reshape(b, n, -1).swapaxes(0, 1)
    per_view = jax.vmap(lambda a, c: clip_softmax_loss(a, c, scale, cfg.label_smoothing))(zi, zt)
    metrics = {"rocket_aug_loss": per_view.mean(), "rocket_logit_scale": jnp.exp(scale)}
    total = per_view
    if want_regions:
        mm = batch["region_text"].shape[1]

        def views(x):  # [b*n, ...] -> [n, b, ...]
            return x.reshape(b, n, *x.shape[1:]).swapaxes(0, 1)

        valid = views(batch["aug_region_valid"].reshape(b * n, mm))
        main_scale = clip_params["logit_scale"]
        region = jax.vmap(lambda r, t, v: region_text_loss(r, t, v, main_scale, cfg.text_filter))(
            views(out["region_emb"]), views(out["region_text_emb"]), valid
        )
        ground = jax.vmap(grounding_loss)(
            views(out["pred_boxes"]), views(batch["aug_region_boxes"].reshape(b * n, mm, 4)), valid
        )
        lam = jax.vmap(region_weight)(valid)
        total = total + lam * (region + ground)
        metrics.update(
            rocket_region_loss=region.mean(), rocket_ground_loss=ground.mean(), rocket_lam=lam.mean()
        )
    return total.mean(), metrics


def make_loss_fn(model: nn.Module, cfg: Config, base_loss_fn: LossFn) -> LossFn:
    """loss_fn(params, batch) -> (loss, metrics) with L = (L_global + n·L_aug)/(1+n).

    `base_loss_fn(clip_params, batch)` is the trainer's own loss on the weak view (it sees
    the batch without the `aug_*` keys and the params without `rocket`).
    """
    n = cfg.num_views

    def loss_fn(params: dict, batch: dict) -> tuple[jax.Array, dict]:
        clip_params, _ = split_params(params)
        weak = {k: v for k, v in batch.items() if not k.startswith("aug_")}
        l_global, metrics = base_loss_fn(clip_params, weak)
        l_aug, aug_metrics = augmented_loss(params, model, batch, cfg)
        loss = (l_global + n * l_aug) / (1 + n)
        metrics = {**metrics, **aug_metrics, "global_loss": l_global, "loss": loss}
        return loss, metrics

    return loss_fn


def clip_loss_fn(model: nn.Module) -> LossFn:
    """Plain CLIP InfoNCE on the weak view: the default global term (and the bench's baseline)."""

    def loss_fn(params: dict, batch: dict) -> tuple[jax.Array, dict]:
        def forward(m, images, text):
            return m.encode_image(images), m.encode_text(text)

        img, txt = model.apply({"params": params}, batch["images"], batch["text"], method=forward)
        loss = clip_softmax_loss(img, txt, params["logit_scale"])
        return loss, {"clip_loss": loss, "loss": loss}

    return loss_fn


# ====================================================================== views (numpy side)
def example_views(
    image: Image.Image,
    caption: str,
    unit_boxes: np.ndarray,
    valid: np.ndarray,
    size: int,
    cfg: Config,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """n strong views of one example whose weak-view boxes are `unit_boxes` (letterbox unit).

    -> pixels uint8 [n,S,S,3], captions list[n], boxes [n,M,4], valid [n,M]. A region
    invalid on the weak view stays invalid; a valid one may be lost to the crop.
    """
    image = image.convert("RGB")
    pix_boxes = unit_to_pixel_boxes(unit_boxes, image.width, image.height, size)
    out_pix, out_caps, out_boxes, out_valid = [], [], [], []
    for _ in range(cfg.num_views):
        view = strong_view(image, pix_boxes, size, rng, cfg.augment)
        out_pix.append(view.pixels)
        out_boxes.append(view.boxes)
        out_valid.append(view.valid & np.asarray(valid, bool))
        out_caps.append(cfg.caption(caption, rng))
    return {
        "pixels": np.stack(out_pix),
        "captions": out_caps,
        "boxes": np.stack(out_boxes).astype(np.float32),
        "valid": np.stack(out_valid),
    }


class RocketDataset:
    """A RegionDataset plus strong views: `batch(step)` is still a pure function of (seed, step).

    Each example's image is decoded a second time from its record (the base pipeline hands
    out only the letterboxed view); strong-view randomness uses default_rng([seed, step, i,
    ROCKET_STREAM]), independent of the base's region sampling stream.
    """

    ROCKET_STREAM = 0x60C7E7

    def __init__(self, base, cfg: Config, tokenize: Callable[[Sequence[str]], np.ndarray]):
        self.base = base
        self.rocket = cfg
        self.tokenize = tokenize
        self.cfg = base.cfg
        self.problems = base.problems

    def __len__(self) -> int:
        return len(self.base)

    def _views(self, step: int, i: int, index: int, boxes: np.ndarray, valid: np.ndarray) -> dict:
        rec = self.base.records[index]
        rng = np.random.default_rng([self.cfg.seed, step, i, self.ROCKET_STREAM])
        with Image.open(rec.image_path) as im:
            im.load()
            return example_views(im, rec.caption, boxes, valid, self.cfg.image_size, self.rocket, rng)

    def batch(self, step: int, pool: ThreadPoolExecutor | None = None) -> dict[str, np.ndarray]:
        out = self.base.batch(step, pool)
        local = len(out["index"])
        first = self.base.process_index * local
        args = [
            (step, first + k, int(out["index"][k]), out["region_boxes"][k], out["region_valid"][k])
            for k in range(local)
        ]
        fn = lambda a: self._views(*a)
        views = list(pool.map(fn, args)) if pool is not None else [fn(a) for a in args]
        n = self.rocket.num_views
        pixels = np.stack([v["pixels"] for v in views])
        out["aug_images"] = normalize(pixels, self.cfg.mean, self.cfg.std)
        caps = [c for v in views for c in v["captions"]]
        out["aug_text"] = np.asarray(self.tokenize(caps), np.int32).reshape(local, n, -1)
        out["aug_region_boxes"] = np.stack([v["boxes"] for v in views])
        out["aug_region_valid"] = np.stack([v["valid"] for v in views])
        return out
