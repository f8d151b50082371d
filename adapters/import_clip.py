"""A local Hugging Face CLIP folder -> JAX params + ModelConfig -> `save_params`.

Accepts a `CLIPModel` folder (both towers, projections, logit scale) or a
`CLIPVisionModel` folder (vision tower only, keys with or without the `vision_model.`
prefix). Weights must be safetensors: a pickled `pytorch_model.bin` can run code when
loaded, so it is refused (convert it with a tool you trust first). Parts the folder lacks
(text tower, projections, prompter, grounding head, logit bias) are initialised fresh from
the JAX model's own initialisers, and the report lists them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from clocmllm.adapters import names
from clocmllm.adapters.hf_config import ExportError, model_fields_from_hf


class ImportClipError(ExportError):
    """A folder that cannot be imported; the message names the file and the reason."""


def read_hf_state(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of the folder's safetensors file(s) as float32 numpy (sharded index ok)."""
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != "prompter.safetensors"]
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickled:
            raise ImportClipError(
                f"{folder}: only pickled weights ({', '.join(pickled)}); refusing to unpickle. "
                "Convert them to safetensors with a tool you trust."
            )
        raise ImportClipError(f"{folder}: no *.safetensors weights")
    state: dict[str, np.ndarray] = {}
    for f in files:
        for key, value in load_file(str(f)).items():
            state[key] = (
                value.astype(np.float32) if value.dtype != np.float32 and value.dtype.kind == "f" else value
            )
    return state


def _vision_prefixed(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5.x saves a CLIPVisionModel without `vision_model.`: put it back."""
    if any(k.startswith("vision_model.") for k in state):
        return state
    return {(k if k.startswith("visual_projection") else f"vision_model.{k}"): v for k, v in state.items()}


def import_clip(
    hf_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Import `hf_dir` into a JAX params checkpoint at workdir `out`; returns a report.

    `overrides` sets ModelConfig fields the folder does not determine (e.g. the sizes of the
    fresh text tower of a vision-only folder, or `prompter_heads`); a field the folder does
    determine cannot be overridden (the weights would not fit).
    """
    import jax

    from clocmllm.encoder.checkpoints import save_params
    from clocmllm.encoder.config import ConfigError, ModelConfig
    from clocmllm.encoder.models.clip import CLIP

    t0 = time.perf_counter()
    folder = Path(hf_dir)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ImportClipError(f"{folder}: no config.json")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ImportClipError(f"{cfg_path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    try:
        fields, towers = model_fields_from_hf(hf_cfg, str(cfg_path))
    except ExportError as err:
        raise ImportClipError(str(err)) from None
    clash = sorted(set(overrides or {}) & set(fields))
    if clash:
        raise ImportClipError(f"{cfg_path}: {clash} are set by the folder and cannot be overridden")
    try:
        cfg = ModelConfig.from_dict({**fields, **(overrides or {})}, source=str(cfg_path))
    except ConfigError as err:
        raise ImportClipError(str(err)) from None
    state = read_hf_state(folder)
    if "vision" in towers and "text" not in towers:
        state = _vision_prefixed(state)

    rules = names.vision_rules(cfg.vision_layers, projection="visual_projection.weight" in state)
    if "text" in towers:
        rules += names.text_rules(cfg.text_layers, projection="text_projection.weight" in state)
    if "logit_scale" in state:
        rules.append(names.Rule("logit_scale", ("logit_scale",), "copy"))
    imported = names.torch_to_jax(state, rules)
    unused = sorted(set(state) - set(names.torch_names(rules)))
    unused = [k for k in unused if not k.endswith("position_ids")]  # buffers of old exports
    if unused:
        raise ImportClipError(f"{folder}: tensors not understood (no JAX param for them): {unused[:8]}")

    model = CLIP(cfg)
    # jit: eager linen init dispatches every op of a full forward pass one by one.
    init = jax.jit(lambda rng: model.init(rng, *model.dummy_inputs(1))["params"])
    fresh = names.flatten(jax.device_get(init(jax.random.key(seed))))
    for path, value in imported.items():
        want = fresh[path].shape
        if tuple(value.shape) != tuple(want):
            raise ImportClipError(
                f"{folder}: {path}: shape {tuple(value.shape)} but config implies {tuple(want)}"
            )
        fresh[path] = value.astype(np.float32).reshape(want)
    placeholders = sorted(p for p in fresh if p not in imported)
    params = names.unflatten(fresh)
    config = {
        # a CLIP checkpoint: `eval encoder` takes its regions by RoI-Align, not through the
        # prompter placeholder below
        "mode": "clip",
        "model": cfg.to_dict(),
        "imported_from": str(folder.absolute()),
        # placeholders, not weights: a run started from here (`init_from`) initialises these
        # itself, with its own prompter settings (encoder/warm_start.py)
        "init_fresh": placeholders,
    }
    tok = folder / "tokenizer.json"
    if tok.is_file():
        config["tokenizer"] = str(tok.absolute())
    ckpt = save_params(out, config, params, step=0)
    report = {
        "checkpoint": ckpt,
        "from": str(folder),
        "towers": towers,
        "imported": len(imported),
        "initialised_fresh": sorted({_group(p, towers) for p in placeholders}),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if verbose:
        print(f"imported {len(imported)} tensors ({'+'.join(towers)}) from {folder} -> {ckpt}")
        if report["initialised_fresh"]:
            print("  initialised fresh (not in the folder): " + ", ".join(report["initialised_fresh"]))
        print(f"  to pretrain from it: clocmllm pretrain --config RECIPE --workdir NEW_DIR --init-from {out}")
    return report


def _group(path: str, towers: list[str]) -> str:
    """A readable name for a freshly initialised param: its tower or module."""
    parts = path.split(names.SEP)
    if parts[0] == "text" and "text" not in towers:
        return "text (whole tower)"
    if parts[0] in ("visual", "text"):
        return SEP_JOIN(parts[:2])
    return parts[0]


SEP_JOIN = names.SEP.join
