"""Name tables between the JAX param tree and the Hugging Face / PyTorch state dicts.

Why a table of plain functions: the linen param tree is a nested dict of arrays (see
`clocmllm.encoder.models.clip`), so the mapping is a flat `jax path -> torch name` dict
plus four layout rules, applied the same way in both directions:

- `copy`:   same array (embeddings, layer norms: linen `scale` == torch `weight`).
- `linear`: linen Dense kernel `[in, out]` is the transpose of torch Linear weight `[out, in]`.
- `conv`:   linen Conv kernel `[p, p, 3, D]` (HWIO) vs torch Conv2d weight `[D, 3, p, p]` (OIHW).
- `qkv`:    one fused linen `qkv` Dense (q, k, v concatenated along the output axis) vs the
            three separate HF `q_proj`, `k_proj`, `v_proj` Linears.

Every name written for the vision tower carries the `vision_model.` prefix (DESIGN.md: a
prefix-less file loads as a random tower in transformers 4.37.2). Arrays are numpy only;
this module imports neither jax nor torch, so both sides can use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SEP = "/"


@dataclass(frozen=True)
class Rule:
    """One mapping row: a JAX path, its torch name(s) and the layout rule between them."""

    jax: str
    torch: tuple[str, ...]
    kind: str  # "copy" | "linear" | "conv" | "qkv"


# ----------------------------------------------------------------------------------- tree utils
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/c": np.ndarray}. Accepts jax arrays (converted to numpy)."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = np.asarray(value)
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(SEP)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# ----------------------------------------------------------------------------------- rule tables
def block_rules(jax_prefix: str, torch_prefix: str) -> list[Rule]:
    """One pre-LN transformer block (HF CLIPEncoderLayer layout)."""
    j, t = jax_prefix, torch_prefix
    return [
        Rule(f"{j}/ln1/scale", (f"{t}.layer_norm1.weight",), "copy"),
        Rule(f"{j}/ln1/bias", (f"{t}.layer_norm1.bias",), "copy"),
        Rule(
            f"{j}/attn/qkv/kernel",
            tuple(f"{t}.self_attn.{n}_proj.weight" for n in "qkv"),
            "qkv",
        ),
        Rule(f"{j}/attn/qkv/bias", tuple(f"{t}.self_attn.{n}_proj.bias" for n in "qkv"), "qkv"),
        Rule(f"{j}/attn/out/kernel", (f"{t}.self_attn.out_proj.weight",), "linear"),
        Rule(f"{j}/attn/out/bias", (f"{t}.self_attn.out_proj.bias",), "copy"),
        Rule(f"{j}/ln2/scale", (f"{t}.layer_norm2.weight",), "copy"),
        Rule(f"{j}/ln2/bias", (f"{t}.layer_norm2.bias",), "copy"),
        Rule(f"{j}/mlp/fc1/kernel", (f"{t}.mlp.fc1.weight",), "linear"),
        Rule(f"{j}/mlp/fc1/bias", (f"{t}.mlp.fc1.bias",), "copy"),
        Rule(f"{j}/mlp/fc2/kernel", (f"{t}.mlp.fc2.weight",), "linear"),
        Rule(f"{j}/mlp/fc2/bias", (f"{t}.mlp.fc2.bias",), "copy"),
    ]


def _dense(jax_prefix: str, torch_prefix: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{jax_prefix}/kernel", (f"{torch_prefix}.weight",), "linear")]
    if bias:
        rules.append(Rule(f"{jax_prefix}/bias", (f"{torch_prefix}.bias",), "copy"))
    return rules


def _norm(jax_prefix: str, torch_prefix: str) -> list[Rule]:
    return [
        Rule(f"{jax_prefix}/scale", (f"{torch_prefix}.weight",), "copy"),
        Rule(f"{jax_prefix}/bias", (f"{torch_prefix}.bias",), "copy"),
    ]


def vision_rules(layers: int, projection: bool = False) -> list[Rule]:
    """`params/visual` -> `CLIPVisionModel` names (+ `visual_projection` for a `CLIPModel`)."""
    v, t = "visual", "vision_model"
    rules = [
        Rule(f"{v}/patch_embed/kernel", (f"{t}.embeddings.patch_embedding.weight",), "conv"),
        Rule(f"{v}/class_embedding", (f"{t}.embeddings.class_embedding",), "copy"),
        Rule(f"{v}/pos_embed", (f"{t}.embeddings.position_embedding.weight",), "copy"),
        *_norm(f"{v}/pre_ln", f"{t}.pre_layrnorm"),  # sic: HF's spelling
    ]
    for i in range(layers):
        rules += block_rules(f"{v}/layer_{i}", f"{t}.encoder.layers.{i}")
    rules += _norm(f"{v}/post_ln", f"{t}.post_layernorm")
    if projection:
        rules += _dense(f"{v}/proj", "visual_projection", bias=False)
    return rules


def text_rules(layers: int, projection: bool = True) -> list[Rule]:
    """`params/text` -> `CLIPTextModel(WithProjection)` / `CLIPModel` text names."""
    x, t = "text", "text_model"
    rules = [
        Rule(f"{x}/token_embed/embedding", (f"{t}.embeddings.token_embedding.weight",), "copy"),
        Rule(f"{x}/pos_embed", (f"{t}.embeddings.position_embedding.weight",), "copy"),
    ]
    for i in range(layers):
        rules += block_rules(f"{x}/layer_{i}", f"{t}.encoder.layers.{i}")
    rules += _norm(f"{x}/final_ln", f"{t}.final_layer_norm")
    if projection:
        rules += _dense(f"{x}/proj", "text_projection", bias=False)
    return rules


def prompter_rules() -> list[Rule]:
    """`params/prompter`, `params/ground`, the image head and logit scalars -> `ClocPrompter` names.

    The torch names are those of `clocmllm.mllm.prompter.ClocPrompter.state_dict()`; its block
    uses HF CLIPEncoderLayer names so `block_rules` serves both towers and the prompter.
    """
    p = "prompter"
    rules = [
        *_dense(f"{p}/box_embed/dense", "box_embed.dense"),
        Rule(f"{p}/box_embed/corner_embed", ("box_embed.corner_embed",), "copy"),
        *_dense(f"{p}/text_in", "text_in"),
        *block_rules(f"{p}/layer", "layer"),
        *_norm(f"{p}/ln", "ln"),
        *_dense(f"{p}/proj", "proj", bias=False),
        *_dense("ground/fc1", "ground_head.fc1"),
        *_dense("ground/fc2", "ground_head.fc2"),
        *_norm("visual/post_ln", "post_layernorm"),
        *_dense("visual/proj", "visual_projection", bias=False),
        Rule("logit_scale", ("logit_scale",), "copy"),
        Rule("logit_bias", ("logit_bias",), "copy"),
    ]
    return rules


# ----------------------------------------------------------------------------------- conversion
def _contiguous(value: np.ndarray) -> np.ndarray:
    """C-contiguous copy keeping 0-d arrays 0-d (`np.ascontiguousarray` makes them 1-d)."""
    return np.require(value, requirements="C")


def _to_torch_layout(kind: str, value: np.ndarray, n_out: int) -> Iterator[np.ndarray]:
    if kind == "copy":
        yield value
    elif kind == "linear":
        yield value.T
    elif kind == "conv":
        yield value.transpose(3, 2, 0, 1)
    elif kind == "qkv":
        parts = np.split(value, n_out, axis=-1)
        for part in parts:
            yield part.T if part.ndim == 2 else part
    else:
        raise ValueError(f"unknown rule kind {kind!r}")


def _to_jax_layout(kind: str, values: list[np.ndarray]) -> np.ndarray:
    if kind == "copy":
        return values[0]
    if kind == "linear":
        return values[0].T
    if kind == "conv":
        return values[0].transpose(2, 3, 1, 0)
    if kind == "qkv":
        return np.concatenate([v.T if v.ndim == 2 else v for v in values], axis=-1)
    raise ValueError(f"unknown rule kind {kind!r}")


def jax_to_torch_views(flat: Mapping[str, np.ndarray], rules: list[Rule]) -> dict[str, np.ndarray]:
    """Apply `rules` to a flat JAX param dict without copying: transposes and splits are numpy
    views. A writer makes each one contiguous only while writing it (peak memory ~1x the
    weights, see `folder_io.write_safetensors`). A missing JAX path is an error naming it."""
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        if rule.jax not in flat:
            raise KeyError(f"JAX param {rule.jax!r} missing (needed for {rule.torch[0]!r})")
        parts = _to_torch_layout(rule.kind, np.asarray(flat[rule.jax]), len(rule.torch))
        for name, part in zip(rule.torch, parts, strict=True):
            out[name] = part
    return out


def jax_to_torch(flat: Mapping[str, np.ndarray], rules: list[Rule]) -> dict[str, np.ndarray]:
    """`jax_to_torch_views` made contiguous (copies): a plain state dict in torch layout."""
    return {name: _contiguous(view) for name, view in jax_to_torch_views(flat, rules).items()}


def torch_to_jax(state: Mapping[str, np.ndarray], rules: list[Rule]) -> dict[str, np.ndarray]:
    """Inverse of `jax_to_torch`; a missing torch name is an error naming it."""
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        missing = [n for n in rule.torch if n not in state]
        if missing:
            raise KeyError(f"tensor {missing[0]!r} missing (needed for JAX param {rule.jax!r})")
        values = [np.asarray(state[n]) for n in rule.torch]
        out[rule.jax] = _contiguous(_to_jax_layout(rule.kind, values))
    return out


def torch_names(rules: list[Rule]) -> list[str]:
    return [name for rule in rules for name in rule.torch]
