"""ModelConfig <-> Hugging Face CLIP config dicts, and what makes a config exportable.

We write `config.json` ourselves (plain dicts, no `save_pretrained`) so the exported folder
does not depend on the transformers version that wrote it; the keys used exist in both
transformers 4.37.2 and 5.x.
"""

from __future__ import annotations

from typing import Any

HF_ACTIVATIONS = ("quick_gelu", "gelu")  # JAX hidden_act -> same HF name, same math
BUGGY_EOS_ID = 2  # HF CLIPTextTransformer pools at argmax(input_ids) when eos_token_id == 2


class ExportError(ValueError):
    """A checkpoint that cannot be written as a Hugging Face CLIP folder; says why."""


def _get(cfg: Any, name: str) -> Any:
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def exportable_reasons(cfg: Any, text: bool = False) -> list[str]:
    """Why `cfg` (ModelConfig or its dict) cannot be a `CLIPVisionConfig`; empty when it can."""
    reasons = []
    if not _get(cfg, "class_token"):
        reasons.append(
            "class_token is false: CLIPVisionModel always has a class token at index 0 "
            "(LLaVA drops index 0 and pools token 0)"
        )
    act = _get(cfg, "hidden_act")
    if act not in HF_ACTIVATIONS:
        reasons.append(f"hidden_act {act!r} has no exact Hugging Face CLIP counterpart {HF_ACTIVATIONS}")
    patch = _get(cfg, "patch_size")
    if not isinstance(patch, int) or isinstance(patch, bool):
        reasons.append(f"patch_size {patch!r} is not one integer: CLIPVisionConfig needs square patches")
    image = _get(cfg, "image_size")
    if not isinstance(image, int) or isinstance(image, bool):
        reasons.append(f"image_size {image!r} is not one integer: CLIPVisionConfig needs square images")
    elif isinstance(patch, int) and image % patch:
        reasons.append(f"image_size {image} is not a multiple of patch_size {patch}")
    if text and _get(cfg, "eot_token_id") == BUGGY_EOS_ID:
        reasons.append(
            "eot_token_id is 2: Hugging Face CLIP then pools at argmax(input_ids) (legacy), "
            "not at the first end-of-text token"
        )
    return reasons


def vision_config(cfg: Any) -> dict[str, Any]:
    """`CLIPVisionConfig` dict with `architectures: ["CLIPVisionModel"]`."""
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": _get(cfg, "vision_width"),
        "intermediate_size": _get(cfg, "vision_mlp_dim"),
        "num_hidden_layers": _get(cfg, "vision_layers"),
        "num_attention_heads": _get(cfg, "vision_heads"),
        "num_channels": 3,
        "image_size": _get(cfg, "image_size"),
        "patch_size": _get(cfg, "patch_size"),
        "hidden_act": _get(cfg, "hidden_act"),
        "layer_norm_eps": float(_get(cfg, "layer_norm_eps")),
        "projection_dim": _get(cfg, "embed_dim"),
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


def text_config(cfg: Any) -> dict[str, Any]:
    """`CLIPTextConfig` dict with `architectures: ["CLIPTextModelWithProjection"]`."""
    return {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": _get(cfg, "vocab_size"),
        "hidden_size": _get(cfg, "text_width"),
        "intermediate_size": _get(cfg, "text_mlp_dim"),
        "num_hidden_layers": _get(cfg, "text_layers"),
        "num_attention_heads": _get(cfg, "text_heads"),
        "max_position_embeddings": _get(cfg, "context_length"),
        "hidden_act": _get(cfg, "hidden_act"),
        "layer_norm_eps": float(_get(cfg, "layer_norm_eps")),
        "projection_dim": _get(cfg, "embed_dim"),
        "eos_token_id": _get(cfg, "eot_token_id"),
        "pad_token_id": _get(cfg, "pad_token_id"),
        "bos_token_id": max(0, _get(cfg, "eot_token_id") - 1),
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


def clip_config(cfg: Any, logit_scale: float) -> dict[str, Any]:
    """Whole `CLIPConfig` dict (`--full-clip`)."""
    vision = {k: v for k, v in vision_config(cfg).items() if k != "architectures"}
    text = {k: v for k, v in text_config(cfg).items() if k != "architectures"}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": _get(cfg, "embed_dim"),
        "logit_scale_init_value": float(logit_scale),
        "vision_config": vision,
        "text_config": text,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


def model_fields_from_hf(config: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """HF `CLIPConfig` / `CLIPVisionConfig` dict -> (ModelConfig fields, towers present).

    Fields absent from the folder (the text tower of a `CLIPVisionModel`) are left out, so
    ModelConfig's defaults apply; the caller says so.
    """
    model_type = config.get("model_type")
    if model_type == "clip":
        vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
        towers = ["vision", "text"]
    elif model_type == "clip_vision_model":
        vision, text, towers = config, None, ["vision"]
    else:
        raise ExportError(f"{source}: model_type {model_type!r} is not 'clip' or 'clip_vision_model'")

    def need(d: dict, key: str, default: Any = None) -> Any:
        if key in d:
            return d[key]
        if default is not None:
            return default
        raise ExportError(f"{source}: field {key!r} missing")

    # Defaults below are those of transformers' CLIPVisionConfig / CLIPTextConfig, which omit
    # fields equal to their defaults when they save.
    fields: dict[str, Any] = {
        "image_size": need(vision, "image_size", 224),
        "patch_size": need(vision, "patch_size", 32),
        "vision_width": need(vision, "hidden_size", 768),
        "vision_layers": need(vision, "num_hidden_layers", 12),
        "vision_heads": need(vision, "num_attention_heads", 12),
        "vision_mlp_dim": need(vision, "intermediate_size", 3072),
        "hidden_act": need(vision, "hidden_act", "quick_gelu"),
        "layer_norm_eps": float(need(vision, "layer_norm_eps", 1e-5)),
        "embed_dim": config.get("projection_dim", vision.get("projection_dim", 512)),
        "class_token": True,
    }
    if text is not None:
        text_act = text.get("hidden_act", "quick_gelu")
        if text_act != fields["hidden_act"]:
            raise ExportError(
                f"{source}: text hidden_act {text_act!r} differs from vision {fields['hidden_act']!r}; "
                "the JAX model has one activation"
            )
        fields.update(
            text_width=need(text, "hidden_size", 512),
            text_layers=need(text, "num_hidden_layers", 12),
            text_heads=need(text, "num_attention_heads", 8),
            text_mlp_dim=need(text, "intermediate_size", 2048),
            vocab_size=need(text, "vocab_size", 49408),
            context_length=need(text, "max_position_embeddings", 77),
            eot_token_id=need(text, "eos_token_id", 49407),
            pad_token_id=need(text, "pad_token_id", 1),
        )
    if fields.get("eot_token_id") == BUGGY_EOS_ID:
        # The OpenAI folders on the Hub still say 2 (fixed in transformers PR #24773, kept
        # for them): HF then pools at argmax(input_ids), the highest id, which in CLIP's BPE is
        # end-of-text, the last id. Our tower pools at `eot_token_id`, so that is the id.
        fields["eot_token_id"] = fields["vocab_size"] - 1
    if fields["hidden_act"] not in HF_ACTIVATIONS:
        raise ExportError(f"{source}: hidden_act {fields['hidden_act']!r} not in {HF_ACTIVATIONS}")
    return fields, towers
