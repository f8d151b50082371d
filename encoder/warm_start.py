"""Start a new run from another checkpoint's weights (`init_from:` in a recipe).

    clocmllm import-clip --hf path/to/clip-vit-base-patch16 --out runs/from_clip
    clocmllm pretrain --config scripts/recipes/b16_cloc.yaml --workdir runs/cloc_from_clip \
        --data DATA --init-from runs/from_clip   # or --set init_from=...

Why not a resume: a resume continues one run (its step, AdamW moments, data position and
config, all checked). A warm start begins a new run at step 0 with fresh moments, the new
recipe's schedule and data, and carries over the weights only: CLOC on top of a CLIP
checkpoint, or a second stage on an earlier run.

Rules, each refused with the parameter or field named rather than guessed around:
- Every parameter of the new model whose path the source holds is copied, and must have the
  same shape there (a different shape: refused, with the model fields that differ). Two
  exceptions follow the usual practice: the image position table of another grid (another
  `image_size`) is resampled bicubically, class row kept (as big_vision and timm do to
  fine-tune at another resolution); a text position table is cut to a shorter
  `context_length` (exact: the causal tower's row i reads rows <= i only).
- A parameter the source lacks, or that the source's config lists under `init_fresh`
  (`import-clip` writes there the parts a Hugging Face folder has no weights for: prompter,
  grounding head, logit bias, a missing text tower), keeps the new run's own initialisation.
  So the prompter's settings (heads, box frequencies) are the recipe's, not the placeholder's.
- Source parameters the new model has no place for (a recipe's extra head, say) are left
  out and counted in the log.
- Model fields that change what copied weights compute without changing a shape
  (`NUMERICS_FIELDS`) must agree with the source's, or the run would silently start from a
  different function.
- The new run uses the source's tokenizer unless the recipe names one: its token ids are
  what the text embedding was trained on (`pretrain` copies the file into the workdir).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("clocmllm.encoder.warm_start")

# Model fields that change what the copied weights compute but no parameter's shape. (The pad
# id is not one: the text tower pools at the first EOT and never reads what follows it.)
NUMERICS_FIELDS = ("hidden_act", "layer_norm_eps", "class_token", "eot_token_id")


class WarmStartError(ValueError):
    """`init_from` names a checkpoint whose weights cannot start this run."""


def source_config(path: str | Path) -> tuple[Path, dict]:
    """(source workdir, its config.yaml) of a workdir or `checkpoints/<step>` folder."""
    from clocmllm.encoder.checkpoints import read_config, resolve_checkpoint

    try:
        workdir, _, _ = resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise WarmStartError(f"init_from: {err}") from None
    config = read_config(workdir)
    if config is None or not isinstance(config.get("model"), Mapping):
        raise WarmStartError(f"init_from: {workdir}: no config.yaml with a model: section")
    return workdir, config


def source_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer file the source was trained (or imported) with, if it names one."""
    from clocmllm.encoder.checkpoints import tokenizer_path

    workdir, config = source_config(path)
    tok = tokenizer_path(config, workdir)
    if tok is not None and not tok.is_file():
        raise WarmStartError(f"init_from: {workdir}/config.yaml names tokenizer {tok}, which does not exist")
    return tok


def flatten(tree: Mapping) -> dict:
    """Nested dict of arrays -> {"visual/conv1/kernel": array} (the paths of `init_fresh`)."""
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping) -> dict:
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep="/")


@dataclass
class WarmStartPlan:
    """Which of the new model's parameters come from the source, and which stay fresh."""

    copied: dict[str, np.ndarray] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # "path (old shape -> new shape)"

    def summary(self) -> dict:
        return {
            "copied": len(self.copied),
            "resized": list(self.resized),
            "fresh": _groups(self.fresh),
            "unused": _groups(self.unused),
        }


def plan(
    target: Mapping[str, tuple[int, ...]],
    source: Mapping[str, np.ndarray],
    keep_fresh: set[str] | frozenset[str] = frozenset(),
    where: str = "init_from",
    field_diffs: str = "",
    class_token: bool = True,
) -> WarmStartPlan:
    """Match the new model's parameter shapes (`target`, flat paths) against the source's
    flat params; raises WarmStartError on the first shape that differs and is not a position
    table `resized_positions` can carry over."""
    out = WarmStartPlan()
    for path, shape in target.items():
        if path not in source or path in keep_fresh:
            out.fresh.append(path)
            continue
        value = source[path]
        if tuple(value.shape) != tuple(shape):
            resized = resized_positions(path, np.asarray(value), tuple(shape), class_token)
            if resized is not None:
                out.copied[path] = resized
                out.resized.append(f"{path} ({tuple(value.shape)} -> {tuple(shape)})")
                continue
            raise WarmStartError(
                f"{where}: {path} has shape {tuple(value.shape)} there, this model wants {tuple(shape)}"
                + (f" (model fields that differ: {field_diffs})" if field_diffs else "")
            )
        out.copied[path] = value
    out.unused = sorted(set(source) - set(target))
    return out


def resized_positions(
    path: str, value: np.ndarray, shape: tuple[int, ...], class_token: bool
) -> np.ndarray | None:
    """`value`, a position table, made to `shape`; None when `path` is none or cannot be."""
    if value.ndim != 2 or len(shape) != 2 or value.shape[1] != shape[1]:
        return None
    if path == "text/pos_embed":
        return value[: shape[0]] if shape[0] <= value.shape[0] else None
    if path != "visual/pos_embed":
        return None
    import jax

    lead = int(class_token)
    old, new = math.isqrt(value.shape[0] - lead), math.isqrt(shape[0] - lead)
    if old * old != value.shape[0] - lead or new * new != shape[0] - lead:
        return None
    grid = value[lead:].astype(np.float32).reshape(old, old, -1)
    grid = np.asarray(jax.image.resize(grid, (new, new, grid.shape[-1]), "bicubic"))
    return np.concatenate([value[:lead], grid.reshape(new * new, -1).astype(value.dtype)])


def check_numerics(source_model: Mapping, model: Mapping, where: str) -> None:
    """Refuses a run whose model computes something else with the same weights."""
    from clocmllm.encoder.config import ModelConfig

    defaults = ModelConfig().to_dict()
    bad = [
        f"{k} ({source_model.get(k, defaults[k])} there, {model.get(k, defaults[k])} here)"
        for k in NUMERICS_FIELDS
        if source_model.get(k, defaults[k]) != model.get(k, defaults[k])
    ]
    if bad:
        raise WarmStartError(
            f"{where}: the copied weights would compute another function: {', '.join(bad)}. "
            "Use the source's model settings and tokenizer (leave model: and tokenizer: out "
            "of the recipe to take both from it)."
        )


def model_diffs(source_model: Mapping, model: Mapping) -> str:
    keys = sorted(k for k in set(source_model) | set(model) if source_model.get(k) != model.get(k))
    return ", ".join(f"{k} {source_model.get(k)} -> {model.get(k)}" for k in keys)


def warm_start_params(params, init_from: str | Path, model: Mapping):
    """`params` (the new run's initialised, possibly sharded, jax arrays) with every
    parameter the source provides replaced by the source's value, on the same sharding."""
    import jax

    from clocmllm.encoder.checkpoints import restore_params

    workdir, config = source_config(init_from)
    where = f"init_from {init_from}"
    check_numerics(config["model"], model, where)
    _, source, step = restore_params(init_from)
    flat = flatten(params)
    fresh = set(config.get("init_fresh") or ())
    diffs = model_diffs(config["model"], model)
    target = {path: leaf.shape for path, leaf in flat.items()}
    chosen = plan(target, flatten(source), fresh, where, diffs, bool(model.get("class_token", True)))

    def put(leaf, value):
        value = np.asarray(value, dtype=leaf.dtype)  # each process takes its shards of it
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

    out = unflatten(
        {p: put(leaf, chosen.copied[p]) if p in chosen.copied else leaf for p, leaf in flat.items()}
    )
    s = chosen.summary()
    log.info(
        "warm start from %s (step %d): %d parameters copied (resized: %s); fresh: %s; not used: %s",
        workdir, step, s["copied"], ", ".join(s["resized"]) or "none", ", ".join(s["fresh"]) or "none",
        ", ".join(s["unused"]) or "none",
    )  # fmt: skip
    return out, {"from": str(workdir), "step": step, **s}


def _groups(paths: list[str]) -> list[str]:
    """Readable summary of parameter paths: their first two levels, counted."""
    counts: dict[str, int] = {}
    for p in paths:
        key = "/".join(p.split("/")[:2])
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} ({n})" for k, n in sorted(counts.items())]
