"""Model configuration: one dataclass, presets stored as YAML data in `encoder/configs/`.

The architecture is data, not code: a preset names sizes only, and every consumer
(trainer, exporter, importer, tests) rebuilds the same model from `ModelConfig.to_dict()`
saved in a workdir's `config.yaml`. Unknown fields are errors (naming file and field), so
a typo in a recipe cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PRESETS = ("tiny", "vit_s16", "b16", "l14", "l14_336", "h14")
ACTIVATIONS = ("quick_gelu", "gelu")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "einsum", "dot_product", "cudnn", "einsum_bthd")


class ConfigError(ValueError):
    """A model config that cannot describe a model; the message names the source and field."""


def checked_fields(cls: type, data: dict[str, Any] | None, source: str, what: str) -> dict[str, Any]:
    """A copy of `data` after checking every key is a field of dataclass `cls`.

    Every config section built from YAML (model, augmentations, recipes, the LCL LM) refuses
    unknown keys the same way, naming the file/section and the key.
    """
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}: unknown {what} field {key!r}")
    return data


@dataclass
class ModelConfig:
    """Sizes and numerics of the CLOC two-tower model (CLIP + prompter + grounding head).

    Defaults are OpenAI CLIP ViT-B/16. `vision_*` maps 1:1 onto Hugging Face
    `CLIPVisionConfig` (hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size), `text_*` onto `CLIPTextConfig`.
    """

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    vocab_size: int = 49408
    context_length: int = 77
    embed_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Adapters (HF CLIPVisionModel, LLaVA's 'patch' selection) need a class token at index 0;
    # False is kept for experiments only and then pools by mean over patch tokens.
    class_token: bool = True
    prompter_heads: int = 1
    # Box prompts attend only to the class token and the patches their box overlaps
    # (`models.prompter.box_attention_bias`; docs/pretraining.md says why).
    prompter_box_mask: bool = False
    # Number of sinusoid frequencies per box coordinate (sin and cos of each).
    prompter_freqs: int = 16
    # Compute dtype; parameters always stay float32 (mixed precision, optax sees f32).
    dtype: str = "float32"
    eot_token_id: int = 49407
    pad_token_id: int = 0
    # 'auto' (default): 'cudnn' on a GPU in bf16/f16, 'einsum' otherwise. 'einsum': [B, H, T,
    # Dh] einsum attention with f32 softmax; 'dot_product': jax.nn.dot_product_attention
    # (XLA's composition); 'cudnn': the same with cuDNN's fused flash attention (GPU, half
    # precision only); 'einsum_bthd': stock Flax layout, a benchmark baseline. Same function
    # (`models.transformer.resolve_attention`; scripts/bench/bench_encoder_attention.py).
    attention_impl: str = "auto"
    # Rematerialise each transformer block in the backward pass (saves activation memory).
    remat: bool = False
    # CLIP's temperature init (1/0.07) and SigLIP's bias init; both are learned scalars.
    logit_scale_init: float = field(default_factory=lambda: math.log(1 / 0.07))
    logit_bias_init: float = -10.0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_image_tokens(self) -> int:
        """Length of the ViT token sequence (class token + patches)."""
        return self.num_patches + int(self.class_token)

    # ------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Build from a mapping; unknown keys and wrong types raise ConfigError naming `source`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: model config must be a mapping, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown model config field {key!r}")
            kwargs[key] = _coerce(key, value, type(getattr(_DEFAULTS, key)), source)
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for width, heads, name in (
            (self.vision_width, self.vision_heads, "vision_heads"),
            (self.text_width, self.text_heads, "text_heads"),
            (self.vision_width, self.prompter_heads, "prompter_heads"),
        ):
            if heads <= 0 or width % heads:
                raise ConfigError(f"{name}: {heads} does not divide width {width}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act: {self.hidden_act!r} not in {ACTIVATIONS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} not in {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl: {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        for name in ("eot_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}: {value} outside vocabulary of size {self.vocab_size}")
        if self.prompter_freqs < 1:
            raise ConfigError(f"prompter_freqs: must be >= 1, got {self.prompter_freqs}")


def _coerce(key: str, value: Any, kind: type, source: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: field {key!r} must be true/false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: field {key!r} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: field {key!r} must be a number, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{source}: field {key!r} must be a string, got {value!r}")
    return value


_DEFAULTS = ModelConfig()


def preset_path(name: str) -> Path:
    """Path of a packaged preset YAML (`tiny`, `b16`, ...)."""
    path = Path(str(resources.files("clocmllm.encoder") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return path


def load_model_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Preset name or YAML path (+ field overrides) -> ModelConfig.

    A YAML file may hold the fields at top level or under a `model:` key (so a workdir's
    full `config.yaml` loads directly).
    """
    text = str(name_or_path)
    if Path(text).suffix in (".yaml", ".yml") or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"{path}: model config file not found")
    else:
        path = preset_path(text)
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of model config fields")
    merged = {**data, **(overrides or {})}
    return ModelConfig.from_dict(merged, source=str(path))
