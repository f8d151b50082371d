"""JAX checkpoint -> Hugging Face CLIP folder (+ the CLOC prompter), checked for parity.

Folder layout (DESIGN.md, "The exported encoder folder"):
    config.json               CLIPVisionConfig, architectures ["CLIPVisionModel"]
    model.safetensors         CLIPVisionModel weights, every key prefixed `vision_model.`
    preprocessor_config.json  CLIPImageProcessor (see `preprocessor_config` for padding)
    prompter.safetensors      ClocPrompter: prompter, grounding head, post-LN + visual
    prompter_config.json        projection, logit scale/bias (clocmllm.mllm.prompter)
    export_report.json        parity diffs, sizes, timings
    text/                     (--text) CLIPTextModelWithProjection + tokenizer.json
With `--full-clip` config/model are a whole `CLIPModel` instead.

We write the state dicts ourselves (safetensors.numpy) rather than `save_pretrained`:
transformers 5.x drops the `vision_model.` prefix, which 4.37.2 (LLaVA-1.5's pin) then
loads as a random tower with only a warning. Everything is written into a temp folder
beside `out`, checked, then renamed into place; a failed check leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from clocmllm.adapters import hf_config, names, parity
from clocmllm.adapters.folder_io import staging_folder, write_json, write_safetensors
from clocmllm.adapters.hf_config import ExportError

REPORT_NAME = "export_report.json"

PADDING_NOTE = (
    "CLOC pretraining resizes the long side to image_size and pads bottom/right with the mean "
    "colour (normalised value 0). CLIPImageProcessor cannot pad: with this config it resizes the "
    "short side and centre-crops, which crops non-square images. LLaVA's image_aspect_ratio 'pad' "
    "pads to a square with the mean colour, CENTRED, then resizes: same content and scale as ours "
    "but shifted by half the padding, so boxes must be mapped with the centred offset. clocmllm's "
    "own tower uses clocmllm.encoder.preprocess (bottom/right padding, clocmllm.boxes.Letterbox) "
    "and never this processor's crop."
)


class ParityError(ExportError):
    """The exported folder does not reproduce the JAX model within tolerance."""


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor settings matching pretraining statistics (see PADDING_NOTE)."""
    from clocmllm.encoder.preprocess import CLIP_MEAN, CLIP_STD

    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # bicubic, as pretraining
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def prompter_config(cfg: Any) -> dict[str, Any]:
    from clocmllm.encoder.models.prompter import box_frequencies

    return {
        "format": "clocmllm-prompter",
        "version": 1,
        "width": cfg.vision_width,
        "embed_dim": cfg.embed_dim,
        "heads": cfg.prompter_heads,
        "mlp_dim": cfg.vision_mlp_dim,
        "box_frequencies": [float(f) for f in box_frequencies(cfg)],
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": float(cfg.layer_norm_eps),
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "class_token": cfg.class_token,
        "box_mask": bool(cfg.prompter_box_mask),
    }


def _params_tree(params: Any) -> dict:
    """Accept `{'params': tree}` (linen variables) or the tree itself."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


def _consume_to_device(tree: dict) -> dict:
    """Replace, in place, every numpy leaf by a JAX array, so each host copy can be freed."""
    import jax

    for key, value in tree.items():
        if isinstance(value, dict):
            _consume_to_device(value)
        else:
            tree[key] = jax.device_put(value)
            del value
    return tree


def _tokenizer_file(config: dict, workdir: Path) -> Path | None:
    tok = config.get("tokenizer")
    if isinstance(tok, dict):
        tok = tok.get("path")
    if not tok:
        return None
    path = Path(tok)
    if not path.is_absolute():
        path = workdir / path
    if path.is_dir():
        path = path / "tokenizer.json"
    return path if path.is_file() else None


def _file_info(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_folder(
    tmp: Path,
    cfg: Any,
    flat: dict[str, np.ndarray],
    full_clip: bool = False,
    text: bool = False,
    tokenizer: Path | None = None,
) -> list[str]:
    """Write every file of the export into `tmp`; returns notes for the report."""
    notes: list[str] = []
    vision = names.jax_to_torch_views(flat, names.vision_rules(cfg.vision_layers, projection=full_clip))
    if full_clip:
        tensors = {**vision, **names.jax_to_torch_views(flat, names.text_rules(cfg.text_layers))}
        tensors["logit_scale"] = np.asarray(flat["logit_scale"], np.float32)
        write_json(tmp / "config.json", hf_config.clip_config(cfg, float(flat["logit_scale"])))
        write_safetensors(tmp / "model.safetensors", tensors)
    else:
        write_json(tmp / "config.json", hf_config.vision_config(cfg))
        write_safetensors(tmp / "model.safetensors", vision)
    write_json(tmp / "preprocessor_config.json", preprocessor_config(cfg.image_size))
    write_json(tmp / "prompter_config.json", prompter_config(cfg))
    write_safetensors(tmp / "prompter.safetensors", names.jax_to_torch_views(flat, names.prompter_rules()))
    if text and not full_clip:
        (tmp / "text").mkdir()
        write_json(tmp / "text" / "config.json", hf_config.text_config(cfg))
        write_safetensors(
            tmp / "text" / "model.safetensors",
            names.jax_to_torch_views(flat, names.text_rules(cfg.text_layers)),
        )
    if text or full_clip:
        dest = tmp / "text" if (text and not full_clip) else tmp
        if tokenizer is not None:
            shutil.copyfile(tokenizer, dest / "tokenizer.json")
        else:
            notes.append("no tokenizer.json found from the checkpoint's config (`tokenizer:`); not copied")
    return notes


def export_encoder(
    checkpoint: str | Path,
    out: str | Path,
    force: bool = False,
    full_clip: bool = False,
    text: bool = False,
    tolerance: float = parity.TOLERANCE,
    n_random: int = 1,
    real_images: tuple[str, ...] = parity.REAL_IMAGES,
    verbose: bool = True,
) -> dict[str, Any]:
    """Export a JAX checkpoint (workdir or `checkpoints/<step>`) to `out`; returns the report.

    Raises ExportError (reason in the message) for a model that cannot be a CLIPVisionConfig,
    ParityError when the exported folder does not reproduce the JAX outputs, FileExistsError
    when `out` exists and not `force`. In every failure `out` is untouched and no temp is left.
    """
    from clocmllm.encoder.checkpoints import resolve_checkpoint, restore_params
    from clocmllm.encoder.config import ConfigError, ModelConfig

    t0 = time.perf_counter()
    out = Path(out).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists; pass --force to replace it")
    workdir, step_dir, _ = resolve_checkpoint(checkpoint)
    config, params, step = restore_params(checkpoint)
    model_dict = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model_dict, dict):
        raise ExportError(f"{workdir}/config.yaml: no `model:` section")
    reasons = hf_config.exportable_reasons(model_dict, text=text or full_clip)
    if reasons:
        raise ExportError(f"{step_dir}: cannot export as a CLIPVisionModel: " + "; ".join(reasons))
    try:
        cfg = ModelConfig.from_dict(model_dict, source=f"{workdir}/config.yaml")
    except ConfigError as err:
        raise ExportError(f"cannot export: {err}") from None
    flat = names.flatten(_params_tree(params))
    t_load = time.perf_counter()

    with staging_folder(out, force) as tmp:
        notes = write_folder(tmp, cfg, flat, full_clip, text, _tokenizer_file(config, workdir))
        t_write = time.perf_counter()
        inputs = parity.parity_inputs(cfg.image_size, cfg.embed_dim, n_random, tuple(real_images))
        token_ids = parity.text_inputs(cfg) if (text or full_clip) else None
        # Memory: the host copy of each param is dropped as it moves to the JAX device, and
        # the device copies are dropped before PyTorch loads the folder (peak ~1x weights).
        del flat
        tree = _consume_to_device(_params_tree(params))
        del params
        ref = parity.jax_outputs(cfg, tree, inputs, token_ids)
        tree.clear()
        del tree
        t_jax = time.perf_counter()
        got = parity.torch_outputs(tmp, inputs, token_ids, tmp / "text" if text and not full_clip else None)
        diffs = parity.compare(ref, got)
        t_torch = time.perf_counter()
        ok = all(d <= tolerance for d in diffs.values())
        if verbose:
            for name, d in diffs.items():
                print(f"  parity {name:<24} {d:.3e} {'ok' if d <= tolerance else 'FAIL'}")
        if not ok:
            bad = {k: v for k, v in diffs.items() if not v <= tolerance}
            raise ParityError(f"parity check failed (tolerance {tolerance:g}): {bad}; nothing written")
        report = {
            "checkpoint": str(step_dir),
            "step": int(step),
            "out": str(out),
            "kind": "CLIPModel" if full_clip else "CLIPVisionModel",
            "text": bool(text or full_clip),
            "model": cfg.to_dict(),
            "parity": {
                "ok": ok,
                "tolerance": tolerance,
                "metric": "max_i |torch_i - jax_i| / max(1, |jax_i|), float32",
                "images": inputs["image_names"],
                "boxes_per_image": int(inputs["boxes"].shape[1]),
                "diffs": diffs,
                "max_abs_diff": max(diffs.values()),
            },
            "preprocessing": PADDING_NOTE,
            "notes": notes,
            "seconds": {
                "restore": round(t_load - t0, 3),
                "write": round(t_write - t_load, 3),
                "parity_jax": round(t_jax - t_write, 3),
                "parity_torch": round(t_torch - t_jax, 3),
            },
        }
        report["files"] = {
            str(p.relative_to(tmp)): _file_info(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / REPORT_NAME, report)
    if verbose:
        for note in notes:
            print(f"  note: {note}")
        print(f"exported {report['kind']} to {out} in {report['seconds']['total']:.1f}s (parity ok)")
    return report


def read_report(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / REPORT_NAME).read_text())
