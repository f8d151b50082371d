"""Saving and loading MLLM folders: stock `LlavaForConditionalGeneration`, or our own format.

Stock (no region features, `mlp2x_gelu` connector): `config.json` of a `LlavaConfig` and
`model.safetensors` in the *legacy* layout
`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`,
`language_model.lm_head.*`. Why legacy: transformers 5.x `save_pretrained` writes
`model.vision_tower.encoder...`, which 4.37.2 (LLaVA-1.5's pin) does not load (random tower,
warning only), while 5.x maps the legacy names onto its own through its checkpoint
conversion table. Both versions are tested to load every weight from this file.

Own format (region features, or a connector the stock class has not): `clocmllm_mllm.json`,
`model.safetensors` with our parameter names, `tower/` (the tower folder's config,
preprocessor and prompter files). Both kinds carry `clocmllm_mllm.json` and the tokenizer, so
`load_model` reads either; loading gives bit-identical logits (tested).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clocmllm.data.atomic import atomic_dir
from clocmllm.mllm.connector import is_stock_llava_projector
from clocmllm.mllm.model import ClocLlava, MllmConfig
from clocmllm.mllm.tower import TowerConfig, VisionTower

META_FILE = "clocmllm_mllm.json"
TOWER_FILES = ("config.json", "preprocessor_config.json", "prompter_config.json", "prompter.safetensors")


def stock_incompatibility(model: ClocLlava) -> list[str]:
    """Why `LlavaForConditionalGeneration` cannot hold this model (empty: it can)."""
    reasons = []
    if model.uses_regions:
        reasons.append(f"model.regions={model.config.regions!r} (stock LLaVA has no <region> features)")
    if model.tower.prompter is not None:
        reasons.append("the tower has a CLOC prompter")
    if model.proposer is not None:
        reasons.append("the model grounds through a box proposer (proposal grounding)")
    if not is_stock_llava_projector(model.config.connector):
        reasons.append(f"model.connector={model.config.connector!r} (stock LLaVA: mlp2x_gelu)")
    if model.tower.config.pool != 1:
        reasons.append(f"model.tower.pool={model.tower.config.pool} (stock LLaVA gives the LLM every patch)")
    if model.tower.config.preprocess not in ("letterbox", "pad"):
        reasons.append(f"model.tower.preprocess={model.tower.config.preprocess!r}")
    if getattr(model.config, "connector_pos", "none") != "none":
        reasons.append(
            f"model.connector_pos={model.config.connector_pos!r} (stock LLaVA adds no patch position "
            "after its projector; the position would be silently lost)"
        )
    return reasons


def is_stock_compatible(model: ClocLlava) -> bool:
    return not stock_incompatibility(model)


def _strip_peft(model: ClocLlava, merge_lora: bool) -> None:
    """Fold LoRA into the base weights (peft `merge_and_unload`) before saving."""
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):
        if not merge_lora:
            raise ValueError("saving an unmerged LoRA model is not supported; use merge_lora=True")
        model.llm = llm.merge_and_unload()


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: tied weights share storage, which safetensors refuses
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def to_legacy_llava(model: ClocLlava) -> dict[str, torch.Tensor]:
    """Our parameter names -> the legacy `LlavaForConditionalGeneration` layout."""
    reasons = stock_incompatibility(model)
    if reasons:
        raise ValueError("cannot export as stock LlavaForConditionalGeneration: " + "; ".join(reasons))
    out: dict[str, torch.Tensor] = {}
    for k, v in model.tower.model.state_dict().items():
        k = k.removeprefix("vision_model.")
        out[f"vision_tower.vision_model.{k}"] = v
    for k, v in model.projector.state_dict().items():
        idx, rest = k.split(".", 1)
        out[f"multi_modal_projector.linear_{1 if idx == '0' else 2}.{rest}"] = v
    llm_sd = model.llm.state_dict()
    if getattr(model.llm.config, "tie_word_embeddings", False):
        llm_sd = {k: v for k, v in llm_sd.items() if k != "lm_head.weight"}
    for k, v in llm_sd.items():
        out[f"language_model.{k}"] = v
    return _contiguous(out)


def from_legacy_llava(sd: dict[str, torch.Tensor], model: ClocLlava) -> dict[str, torch.Tensor]:
    tower_keys = set(model.tower.model.state_dict())
    prefixed = any(k.startswith("vision_model.") for k in tower_keys)
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_tower.vision_model."):
            rest = k.removeprefix("vision_tower.vision_model.")
            out["tower.model." + ("vision_model." + rest if prefixed else rest)] = v
        elif k.startswith("multi_modal_projector.linear_"):
            n, rest = k.removeprefix("multi_modal_projector.linear_").split(".", 1)
            out[f"projector.{0 if n == '1' else 2}.{rest}"] = v
        elif k.startswith("language_model."):
            out["llm." + k.removeprefix("language_model.")] = v
        else:
            raise ValueError(f"unexpected key in a Llava checkpoint: {k}")
    return out


def _stock_config(model: ClocLlava, tokenizer):
    from transformers import LlavaConfig

    tcfg = model.llm.config.to_dict()
    vcfg = model.tower.vision_config.to_dict()
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=model.config.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if model.tower.config.feature == "patch" else "full",
        vision_feature_layer=model.tower.config.layer,
        image_seq_length=model.tower.num_tokens,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(tcfg.get("tie_word_embeddings", False)),
    )
    d = cfg.to_dict()
    d["architectures"] = ["LlavaForConditionalGeneration"]
    d["vocab_size"] = tcfg["vocab_size"]  # 4.37.2 reads the top-level vocab size
    return d


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def save_model(
    model: ClocLlava, tokenizer, out_dir: str | Path, merge_lora: bool = True, kind: str = "auto"
) -> str:
    """Write the folder atomically (temp dir then rename). Returns 'stock' or 'clocmllm'.

    `kind`: `auto` (stock when the model allows it), `stock` (refused, with the reasons, for
    a model the stock class cannot hold) or `clocmllm` (our format always).
    """
    if kind not in ("auto", "stock", "clocmllm"):
        raise ValueError(f"save_model: kind must be auto, stock or clocmllm, got {kind!r}")
    _strip_peft(model, merge_lora)
    if kind == "stock" and (reasons := stock_incompatibility(model)):
        raise ValueError(
            f"{out_dir}: cannot save as a stock LlavaForConditionalGeneration folder: " + "; ".join(reasons)
        )
    if kind == "auto":
        kind = "stock" if is_stock_compatible(model) else "clocmllm"
    with atomic_dir(out_dir) as tmp:
        tower_dir = tmp / "tower"
        tower_dir.mkdir()
        src = Path(model.tower.config.path)
        for name in TOWER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tower_dir / name)
        model.tower.vision_config.to_json_file(tower_dir / "config.json")
        tokenizer.save_pretrained(tmp)
        meta = {"format": "clocmllm-mllm", "version": 1, "kind": kind, "model": model.config.to_dict()}
        meta["model"]["tower"]["path"] = "tower"
        meta["model"]["llm"] = {"config": {**model.llm.config.to_dict()}}
        _write_json(tmp / META_FILE, meta)
        if kind == "stock":
            _write_json(tmp / "config.json", _stock_config(model, tokenizer))
            save_file(to_legacy_llava(model), tmp / "model.safetensors", metadata={"format": "pt"})
            _write_json(tmp / "preprocessor_config.json", _image_processor_config(model))
        else:
            sd = model.state_dict()
            if getattr(model.llm.config, "tie_word_embeddings", False):
                sd.pop("llm.lm_head.weight", None)
            save_file(_contiguous(sd), tmp / "model.safetensors", metadata={"format": "pt"})
    return kind


def _image_processor_config(model: ClocLlava) -> dict:
    """For stock users: CLIP processor values. Note ours pads (letterbox/pad), CLIP's crops."""
    s = model.tower.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": s},
        "do_center_crop": True,
        "crop_size": {"height": s, "width": s},
        "do_normalize": True,
        "image_mean": model.tower.mean,
        "image_std": model.tower.std,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_convert_rgb": True,
    }


def load_model(folder: str | Path, device: str | torch.device = "cpu"):
    """Any folder `save_model` wrote -> (ClocLlava in eval mode, tokenizer)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    folder = Path(folder)
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder}: no {META_FILE} (not a clocmllm MLLM folder)")
    meta = json.loads(meta_file.read_text())
    mcfg = dict(meta["model"])
    tcfg = TowerConfig(**{**mcfg.pop("tower"), "path": str(folder / "tower")})
    config = MllmConfig(tower=tcfg, **mcfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vision = CLIPVisionModel(CLIPVisionConfig.from_pretrained(folder / "tower"))
    tower = VisionTower(tcfg, model=vision)
    llm_cfg = dict(config.llm["config"])
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg))
    model = ClocLlava(config, llm, tower)
    sd = load_file(folder / "model.safetensors")
    if meta["kind"] == "stock":
        sd = from_legacy_llava(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"llm.lm_head.weight"} if getattr(llm.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{folder}/model.safetensors: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        llm.tie_weights()
    return model.to(device).eval(), tokenizer
