"""Workdir layout and orbax checkpoints of the encoder trainer.

    WORKDIR/config.yaml            full resolved training config (model: = ModelConfig.to_dict())
    WORKDIR/metrics.jsonl          one JSON object per logged step
    WORKDIR/checkpoints/<step>/    orbax: items `params`, `opt_state` (training only), `meta` (JSON)

`meta` holds the step, the data iterator position and the RNG key, so a resumed run picks
up exactly where the killed one stopped. Atomicity is orbax's: a checkpoint is written to a
temporary folder and renamed when complete, so a kill mid-save leaves the previous one.
Never pickled: orbax (tensorstore) for arrays, JSON/YAML for the rest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"


def write_yaml_atomic(path: str | os.PathLike, data: Mapping) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(_plain(data), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def read_config(workdir: str | os.PathLike) -> dict | None:
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def manager(
    workdir: str | os.PathLike, keep: int | None = 3, items=("params", "opt_state", "meta")
) -> ocp.CheckpointManager:
    """A CheckpointManager over `WORKDIR/checkpoints` keeping the last `keep` steps."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / CKPT_DIR, options=opts, item_names=items)


def save_state(mgr: ocp.CheckpointManager, step: int, params, opt_state, meta: Mapping) -> None:
    """Queue an (async) save of a full training state; `mgr.wait_until_finished()` to block."""
    mgr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(_plain(meta)),
        ),
        force=True,
    )


def restore_state(mgr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
    """Restore (params, opt_state, meta) at `step` onto the shardings of the abstract trees."""
    out = mgr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out["params"], out["opt_state"], out["meta"]


def save_params(workdir: str | os.PathLike, config: Mapping, params, step: int) -> str:
    """Params-only checkpoint in the trainer's layout (used by import-clip and tests).

    Writes `config.yaml` too; returns the checkpoint folder `WORKDIR/checkpoints/<step>`.
    """
    workdir = Path(workdir)
    write_yaml_atomic(workdir / CONFIG_FILE, config)
    mgr = manager(workdir, keep=None, items=("params", "meta"))
    mgr.save(
        int(step),
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave({"step": int(step)})
        ),
        force=True,
    )
    mgr.wait_until_finished()
    mgr.close()
    return str(workdir.absolute() / CKPT_DIR / str(int(step)))


def finished_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the workdir's finished checkpoints (orbax renames a step folder into place
    only when it is complete, so a numbered folder with `params/` is one)."""
    root = Path(workdir) / CKPT_DIR
    if not root.is_dir():
        return []
    return [int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "params").is_dir()]


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path, int]:
    """(workdir, step folder, step) for a workdir (latest step) or a `checkpoints/<step>` dir."""
    path = Path(path).absolute()
    if (path / CKPT_DIR).is_dir():
        steps = finished_steps(path)
        if not steps:
            raise FileNotFoundError(f"{path}: no finished checkpoint under {CKPT_DIR}/")
        step = max(steps)
        return path, path / CKPT_DIR / str(step), step
    if path.name.isdigit() and (path / "params").is_dir():
        return path.parent.parent, path, int(path.name)
    raise FileNotFoundError(f"{path}: neither a workdir with {CKPT_DIR}/ nor a checkpoints/<step> folder")


def restore_params(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(config, params as host numpy arrays, step) without touching the optimizer state.

    Works whatever mesh the checkpoint was written from (arrays are restored unsharded).
    """
    workdir, step_dir, step = resolve_checkpoint(path)
    config = read_config(workdir)
    if config is None:
        raise FileNotFoundError(f"{workdir}: no {CONFIG_FILE} next to the checkpoints")
    # The item's handler, not a standalone Checkpointer: `params/` is one item of the step's
    # composite checkpoint, whose `_CHECKPOINT_METADATA` sits a level up, so a Checkpointer
    # on the item folder logs "Metadata file does not exist" at every restore.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(step_dir / "params")
        meta = getattr(meta, "item_metadata", meta)
        tree = getattr(meta, "tree", meta)
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree, is_leaf=lambda x: hasattr(x, "shape")
        )
        params = handler.restore(step_dir / "params", args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()
    return config, params, step


def load_tokenizer(config: Mapping, workdir: str | os.PathLike):
    """The run's tokenizer (`config['tokenizer']`, relative paths resolved against `workdir`)."""
    from clocmllm.encoder.tokenizer import Tokenizer

    path = tokenizer_path(config, workdir)
    if path is None:
        raise FileNotFoundError(f"{workdir}: config.yaml names no tokenizer")
    return Tokenizer.from_file(path, context_length=int(config["model"]["context_length"]))


def tokenizer_path(config: Mapping, workdir: str | os.PathLike) -> Path | None:
    """The tokenizer file `config` names (relative to `workdir`), None when it names none."""
    path = config.get("tokenizer")
    if not path:
        return None
    return Path(path) if Path(path).is_absolute() else Path(workdir) / path


def _plain(obj):
    """YAML/JSON-safe copy (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
