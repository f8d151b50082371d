"""AdamW with linear warm-up, cosine decay, global-norm clipping and a weight-decay mask.

Paper settings (CLOC, Sec. 4): AdamW (0.9, 0.98), peak LR 5e-4, cosine decay, 2k warm-up,
weight decay 0.2. eps 1e-6 follows OpenCLIP's ViT recipes (the paper does not say).

Weight decay applies only to weight matrices (leaves named `kernel`: Dense and Conv). Norm
scales/biases, all biases, token and corner-type embeddings, the class token, position
embeddings and `logit_scale`/`logit_bias` are not decayed: decaying them pulls scales and
the temperature towards 0, the standard CLIP/OpenCLIP exclusion list.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax

DEFAULTS = {
    "lr": 5e-4,
    "warmup_steps": 2000,
    "weight_decay": 0.2,
    "b1": 0.9,
    "b2": 0.98,
    "eps": 1e-6,
    "clip_norm": 1.0,
    "end_lr": 0.0,
}


def decay_mask(params) -> object:
    """Pytree of bools: True where weight decay applies (leaves named `kernel`)."""

    def is_decayed(path, _leaf) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name == "kernel"

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def lr_schedule(cfg: Mapping, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine to `end_lr` at `total_steps`."""
    c = {**DEFAULTS, **cfg}
    warmup = int(min(c["warmup_steps"], max(total_steps - 1, 0)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(c["lr"]),
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=float(c["end_lr"]),
    )


def build_optimizer(cfg: Mapping, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The training optimizer from the config's `optim:` section and the run length."""
    c = {**DEFAULTS, **cfg}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"optim: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    schedule = lr_schedule(c, total_steps)
    parts = []
    if c["clip_norm"] and float(c["clip_norm"]) > 0:
        parts.append(optax.clip_by_global_norm(float(c["clip_norm"])))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(c["b1"]),
            b2=float(c["b2"]),
            eps=float(c["eps"]),
            weight_decay=float(c["weight_decay"]),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
