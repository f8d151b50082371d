"""Fine-tuning configuration: YAML as data, `--set a.b=value` overrides, defaults in one place."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

DEFAULTS: dict = {
    "model": {
        "tower": {
            "path": None,
            "layer": -2,
            "feature": "patch",
            "preprocess": "letterbox",
            "trainable": False,
        },
        "connector": "mlp2x_gelu",
        "connector_pos": "none",  # none | sincos2d | learned: (row, col) added to image tokens
        "image_position": "first",  # first | after_prompt: where <image> sits in the first message
        "regions": "shared",
        "template": "v1",
        "llm": {},
        "tokenizer": {"path": None},  # None: build a word-level tokenizer from the training text
        "init_from": None,  # a saved MLLM folder (e.g. the stage-1 output) to start from
        "proposer": None,  # a `clocmllm proposer` folder: proposal grounding (mllm/proposer.py)
        "candidate_position": "after_image",  # after_image | after_prompt: where the candidates go
        "candidate_pointer": True,  # pointer logits for the candidate names (mllm/pointer.py)
    },
    # dual_grounding: a template like "Locate the {phrase}." turns every referring turn around
    # into an extra grounding sample (dataset.dual_grounding_record); None: off.
    "data": {"train": None, "max_length": 512, "dual_grounding": None},
    "train": {
        "stage": 2,  # 1: connector only; 2: connector + LLM (full or LoRA), tower per tower.trainable
        "lora": None,  # {r, alpha, dropout, target_modules}
        "optimizer": "adamw",  # adamw | sgd (sgd makes update-equivalence tests sharp)
        "lr": 2e-4,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,  # LLaVA's; 0 disables clipping (DeepSpeed: gradient_clipping)
        "warmup_ratio": 0.03,
        "epochs": 1,
        "max_steps": None,
        "batch_size": 4,  # per process
        "grad_accum": 1,
        "gradient_checkpointing": False,
        "save_every": 0,  # steps; 0 = only the final model
        "resume": True,
        "seed": 0,
        "shuffle": True,
        "deepspeed": None,  # path to a DeepSpeed JSON (scripts/deepspeed/zero2.json)
        "mixed_precision": "no",
        "log_every": 1,
        "output_dir": "runs/mllm",
        "plot": True,
        "token_loss_weights": None,  # {regex on the token string: weight}, token_weights.py
    },
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and out[k]:
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_set(config: dict, assignment: str) -> None:
    """`train.lr=1e-4` (value parsed as YAML) into the nested config."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    node = config
    parts = key.strip().split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None, sets: list[str] | tuple[str, ...] = ()) -> dict:
    user: dict = {}
    if path is not None:
        path = Path(path)
        user = yaml.safe_load(path.read_text()) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        unknown = set(user) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    for s in sets:
        apply_set(user, s)
    cfg = merge(DEFAULTS, user)
    _coerce_numbers(cfg)
    if not cfg["data"]["train"]:
        raise ValueError("data.train: required (a LLaVA conversation JSON)")
    if not cfg["model"]["tower"]["path"] and not cfg["model"]["init_from"]:
        raise ValueError("model.tower.path: required (an exported CLOC or HF CLIP vision folder)")
    if cfg["train"]["stage"] not in (1, 2):
        raise ValueError(f"train.stage: must be 1 or 2, got {cfg['train']['stage']!r}")
    return cfg


_FLOATS = ("lr", "weight_decay", "warmup_ratio", "max_grad_norm")
_INTS = ("epochs", "batch_size", "grad_accum", "save_every", "seed", "log_every", "stage")


def _coerce_numbers(cfg: dict) -> None:
    """YAML 1.1 reads `3e-3` as a string: numbers are converted here, with a clear error."""
    tc = cfg["train"]
    for keys, kind in ((_FLOATS, float), (_INTS, int)):
        for k in keys:
            try:
                tc[k] = kind(tc[k])
            except (TypeError, ValueError) as err:
                raise ValueError(f"train.{k}: expected a number, got {tc[k]!r}") from err
    if tc["max_steps"] is not None:
        tc["max_steps"] = int(tc["max_steps"])
    cfg["data"]["max_length"] = int(cfg["data"]["max_length"])
