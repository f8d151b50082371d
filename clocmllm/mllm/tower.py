"""The vision tower: an exported CLOC folder or any Hugging Face CLIP vision folder.

Loads `CLIPVisionModel` folders (our export, with `vision_model.`-prefixed keys) and the
vision half of a full `CLIPModel` folder. It selects one hidden layer (LLaVA reads
`hidden_states[-2]`, the default here) in `patch` mode (drop the class token, LLaVA's
default) or `cls_patch` mode (keep it, LLaVA's "full"). Preprocessing and box geometry are
delegated to `clocmllm.mllm.geometry`, the single place where boxes are rescaled.

Region features: the CLOC prompter of the folder when it has one (its ViT-width output
`feat` for the box, which shares the connector input width with the patch features), else
RoI-Align over the selected layer's patch grid (a baseline for plain CLIP).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from clocmllm.mllm.geometry import Geometry
from clocmllm.mllm.roi_align import roi_align

log = logging.getLogger("clocmllm.mllm")

FEATURE_MODES = ("patch", "cls_patch")
REGION_MODES = ("auto", "prompter", "roi_align")


@dataclass
class TowerConfig:
    path: str
    layer: int = -2
    feature: str = "patch"
    preprocess: str = "letterbox"
    trainable: bool = False
    region: str = "auto"  # auto: the prompter when the folder has one, else RoI-Align
    pool: int = 1  # average k x k patches into one image token (region features keep the full grid)

    def __post_init__(self) -> None:
        if self.feature not in FEATURE_MODES:
            raise ValueError(f"tower.feature must be one of {FEATURE_MODES}, got {self.feature!r}")
        if self.region not in REGION_MODES:
            raise ValueError(f"tower.region must be one of {REGION_MODES}, got {self.region!r}")
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ValueError(f"tower.pool must be a positive integer, got {self.pool!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def load_clip_vision(folder: str | Path):
    """A `CLIPVisionModel` from a CLIPVisionModel or CLIPModel folder; every weight from the file."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face CLIP folder)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in ("clip_vision_model", "clip"):
        raise ValueError(f"{cfg_file}: model_type: expected clip_vision_model or clip, got {model_type!r}")
    config = CLIPVisionConfig.from_pretrained(folder)  # takes vision_config out of a clip config
    model, info = CLIPVisionModel.from_pretrained(folder, config=config, output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(
            f"{folder}: weights missing for {sorted(info['missing_keys'])[:5]}... "
            "(a 5.x CLIPVisionModel save without the `vision_model.` prefix?)"
        )
    return model


def _preprocessor(folder: Path, image_size: int) -> tuple[list[float], list[float]]:
    """Mean and std from preprocessor_config.json, CLIP's values when absent."""
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    f = folder / "preprocessor_config.json"
    if f.is_file():
        cfg = json.loads(f.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return list(mean), list(std)


class VisionTower(nn.Module):
    def __init__(self, config: TowerConfig, model: nn.Module | None = None):
        """`model=None` loads the folder's weights; a given (config-built) model is used as is."""
        super().__init__()
        self.config = config
        folder = Path(config.path)
        self.model = load_clip_vision(folder) if model is None else model
        self.vision_config = self.model.config
        self.image_size = int(self.vision_config.image_size)
        self.grid = self.image_size // int(self.vision_config.patch_size)
        if self.grid % config.pool:
            raise ValueError(
                f"tower.pool={config.pool} does not divide the {self.grid}x{self.grid} patch grid of {folder}"
            )
        self.mean, self.std = _preprocessor(folder, self.image_size)
        self.prompter = None
        if config.region in ("auto", "prompter"):
            self.prompter = _load_prompter(folder)
            if self.prompter is None and config.region == "prompter":
                raise ValueError(f"{folder}: tower.region=prompter but the folder has no prompter")
        self.set_trainable(config.trainable)

    @property
    def hidden_size(self) -> int:
        return int(self.vision_config.hidden_size)

    @property
    def token_grid(self) -> int:
        """Image tokens per side as the LLM sees them (the patch grid after `pool`)."""
        return self.grid // self.config.pool

    @property
    def num_tokens(self) -> int:
        return self.token_grid**2 + (1 if self.config.feature == "cls_patch" else 0)

    def patch_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, (1+)N, D] tokens -> their N patches as a [B, D, grid, grid] map (any class token dropped)."""
        patches = tokens[:, -self.grid * self.grid :]
        b, _, d = patches.shape
        return patches.transpose(1, 2).reshape(b, d, self.grid, self.grid)

    def image_tokens(self, selected: torch.Tensor) -> torch.Tensor:
        """The selected features as the LLM sees them: the patch grid pooled k x k."""
        k = self.config.pool
        if k == 1:
            return selected
        pooled = torch.nn.functional.avg_pool2d(self.patch_grid(selected), k).flatten(2).transpose(1, 2)
        return torch.cat([selected[:, : -self.grid * self.grid], pooled], dim=1)

    @property
    def region_source(self) -> str:
        return "prompter" if self.prompter is not None else "roi_align"

    def set_trainable(self, trainable: bool) -> None:
        self.config.trainable = trainable
        for p in self.parameters():
            p.requires_grad_(trainable)

    # ---- preprocessing --------------------------------------------------------------
    def geometry(self, width: int, height: int) -> Geometry:
        return Geometry(width, height, self.image_size, self.config.preprocess)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        """PIL image -> ([3, S, S] normalised tensor, its geometry)."""
        geom = self.geometry(*image.size)
        fill = tuple(int(round(m * 255)) for m in self.mean)
        square = geom.apply(image, fill)
        arr = np.asarray(square, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), geom

    # ---- features ---------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (selected features [B, T, Dv], last_hidden_state [B, 1+N, Dv])."""
        dtype = next(self.model.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.trainable):
            out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.config.layer]
        selected = hidden[:, 1:] if self.config.feature == "patch" else hidden
        return selected, out.last_hidden_state

    def region_features(
        self, selected: torch.Tensor, last_hidden: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor:
        """[B, M, 4] unit boxes of the model's square -> [B, M, Dv] region features."""
        if self.prompter is not None:
            _emb, feat = self.prompter(last_hidden, boxes.to(last_hidden.dtype))
            return feat
        return roi_align(self.patch_grid(selected), boxes)


def _load_prompter(folder: Path):
    try:
        from clocmllm.mllm.prompter import ClocPrompter
    except ModuleNotFoundError as err:  # the adapters engineer's module is not there yet
        if err.name != "clocmllm.mllm.prompter":
            raise
        if (folder / "prompter.safetensors").is_file():
            log.warning("%s has a prompter but clocmllm.mllm.prompter is missing: using RoI-Align", folder)
        return None
    return ClocPrompter.from_folder(folder)
