"""Resumable training checkpoints without pickle: trainable weights and optimizer state as safetensors.

A checkpoint `step_N/` holds `trainable.safetensors` (only parameters that train: the frozen
rest is rebuilt from the config and seed), `optimizer.safetensors` (per-parameter state
tensors) plus `state.json` (step, epoch, batches done in the epoch, param_groups). Written
to a temp folder, then renamed. DeepSpeed runs use DeepSpeed's own checkpoint instead
(its engine owns the partitioned optimizer state).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous().clone()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(folder: Path, model, optimizer, state: dict) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    tensors, groups = optimizer_tensors(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, **groups}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def latest_checkpoint(root: Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name))]
    return max(steps)[1] if steps else None


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    folder = Path(folder)
    weights = load_file(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"{folder}: trainable parameters not in checkpoint: {missing[:5]}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(folder / "optimizer.safetensors")
    opt_state: dict = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = t
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state
