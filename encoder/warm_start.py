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
  same shape there (a different shape: refused, with the model fields that differ).
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
    workdir, config = source_config(path)
    name = config.get("tokenizer")
    if not name:
        return None
    tok = Path(name) if Path(name).is_absolute() else workdir / name
    if not tok.is_file():
        raise WarmStartError(f"init_from: {workdir}/config.yaml names tokenizer {tok}, which does not exist")
    return tok


def flatten(tree: Mapping) -> dict:
    """Nested dict of arrays -> {"visual/conv1/kernel": array} (the paths of `init_fresh`)."""
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree), sep="/")


@dataclass
class WarmStartPlan:
    """Which of the new model's parameters come from the source, and which stay fresh."""

    copied: dict[str, np.ndarray] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "copied": len(self.copied),
            "fresh": _groups(self.fresh),
            "unused": _groups(self.unused),
        }


def plan(
    target: Mapping[str, tuple[int, ...]],
    source: Mapping[str, np.ndarray],
    keep_fresh: set[str] | frozenset[str] = frozenset(),
    where: str = "init_from",
    field_diffs: str = "",
) -> WarmStartPlan:
    """Match the new model's parameter shapes (`target`, flat paths) against the source's
    flat params; raises WarmStartError on the first shape that differs."""
    out = WarmStartPlan()
    for path, shape in target.items():
        if path not in source or path in keep_fresh:
            out.fresh.append(path)
            continue
        value = source[path]
        if tuple(value.shape) != tuple(shape):
            raise WarmStartError(
                f"{where}: {path} has shape {tuple(value.shape)} there, this model wants {tuple(shape)}"
                + (f" (model fields that differ: {field_diffs})" if field_diffs else "")
            )
        out.copied[path] = value
    out.unused = sorted(set(source) - set(target))
    return out


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
    source = flatten(source)
    target = {jax.tree_util.keystr(p, simple=True, separator="/"): leaf.shape for p, leaf in _leaves(params)}
    chosen = plan(
        target, source, set(config.get("init_fresh") or ()), where, model_diffs(config["model"], model)
    )

    def put(path, leaf):
        value = chosen.copied.get(jax.tree_util.keystr(path, simple=True, separator="/"))
        if value is None:
            return leaf
        value = np.asarray(value, dtype=leaf.dtype)  # each process takes its shards of it
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

    out = jax.tree_util.tree_map_with_path(put, params)
    s = chosen.summary()
    log.info(
        "warm start from %s (step %d): %d parameters copied; fresh: %s; not used: %s",
        workdir, step, s["copied"], ", ".join(s["fresh"]) or "none", ", ".join(s["unused"]) or "none",
    )  # fmt: skip
    return out, {"from": str(workdir), "step": step, **s}


def _leaves(params):
    import jax

    return jax.tree_util.tree_flatten_with_path(params)[0]


def _groups(paths: list[str]) -> list[str]:
    """Readable summary of parameter paths: their first two levels, counted."""
    counts: dict[str, int] = {}
    for p in paths:
        key = "/".join(p.split("/")[:2])
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} ({n})" for k, n in sorted(counts.items())]
