"""The LLaVA-style model: vision tower -> connector -> any Hugging Face causal LM.

Sequence layout is the one of transformers 5.x `LlavaForConditionalGeneration`: `<image>` is
expanded to one token per image feature (the data code does it), and the model writes the
projected features into those positions. So our logits and the stock class's logits can be
compared position by position, and a model without regions saves as a stock folder.

Referring: each `<region>` token's embedding is replaced by the region feature of its box
(prompter or RoI-Align, see `tower.py`) through the region connector:
`regions: shared` (the image connector), `own` (a second connector of the same kind, so
region and patch statistics may differ), or `none` (`<region>` stays an ordinary token).

`connector_pos` (default `none`): an explicit (row, col) embedding added to the projected
image tokens, see `patch_position.py`; region tokens get none (the prompter encodes the box).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from clocmllm.mllm.connector import build_connector
from clocmllm.mllm.patch_position import PatchPosition, check_mode
from clocmllm.mllm.templates import IMAGE_POSITIONS
from clocmllm.mllm.tower import TowerConfig, VisionTower

REGION_MODES = ("none", "shared", "own")


@dataclass
class MllmConfig:
    tower: TowerConfig
    connector: str = "mlp2x_gelu"
    regions: str = "shared"
    image_token_id: int = -1
    region_token_id: int = -1
    template: str = "auto"
    llm: dict = field(default_factory=dict)  # {"path": DIR} or {"config": {model_type: ..., ...}}
    connector_pos: str = "none"  # none | sincos2d | learned (patch_position.py)
    image_position: str = "first"  # first | after_prompt (templates.place_image)

    def __post_init__(self) -> None:
        if isinstance(self.tower, dict):
            self.tower = TowerConfig(**self.tower)
        if self.regions not in REGION_MODES:
            raise ValueError(f"model.regions must be one of {REGION_MODES}, got {self.regions!r}")
        check_mode(self.connector_pos)
        if self.image_position not in IMAGE_POSITIONS:
            raise ValueError(
                f"model.image_position must be one of {IMAGE_POSITIONS}, got {self.image_position!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tower"] = self.tower.to_dict()
        return d


SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size")


def build_llm(spec: dict, vocab_size: int | None = None):
    """`{"path": DIR}` (pretrained, local) or `{"config": {...}}` (random init from a config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.get("path"):
        llm = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32)
    elif spec.get("config"):
        cfg = dict(spec["config"])
        if "model_type" not in cfg:
            raise ValueError("model.llm.config: needs `model_type` (e.g. llama, qwen2)")
        model_type = cfg.pop("model_type")
        # A config with no sizes silently gets the architecture's full default (7B-class for
        # llama/qwen2: tens of GB at random init). Random-init models must say their size.
        missing = [k for k in SIZE_KEYS if k not in cfg]
        if missing:
            raise ValueError(
                f"model.llm.config: a random-init LLM needs its size; missing {missing} "
                "(for pretrained weights use model.llm.path instead)"
            )
        if vocab_size is not None:
            cfg["vocab_size"] = vocab_size
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    else:
        raise ValueError("model.llm needs `path` (a local causal LM folder) or `config` (a dict)")
    if vocab_size is not None and llm.get_input_embeddings().num_embeddings < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    return llm


class ClocLlava(nn.Module):
    def __init__(self, config: MllmConfig, llm: nn.Module, tower: VisionTower):
        super().__init__()
        self.config = config
        self.tower = tower
        self.llm = llm
        width = llm.get_input_embeddings().embedding_dim
        self.projector = build_connector(config.connector, tower.hidden_size, width)
        self.region_projector = (
            build_connector(config.connector, tower.hidden_size, width) if config.regions == "own" else None
        )
        self.patch_position = (
            PatchPosition(
                config.connector_pos, tower.grid, width, has_cls=tower.config.feature == "cls_patch"
            )
            if config.connector_pos != "none"
            else None
        )

    @property
    def uses_regions(self) -> bool:
        return self.config.regions != "none"

    def region_connector(self) -> nn.Module:
        return self.region_projector if self.region_projector is not None else self.projector

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features (and region features) written in."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        selected, last = self.tower(pixel_values)
        image = self.projector(selected)
        if self.patch_position is not None:
            image = self.patch_position(image)
        image = image.to(embeds.dtype)
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != image.shape[0] * image.shape[1]:
            raise ValueError(
                f"{int(mask.sum())} <image> tokens for {image.shape[0]} images of {image.shape[1]} tokens "
                "(each sample needs exactly one expanded <image>)"
            )
        embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), image)
        if self.uses_regions:
            if (
                region_boxes is None
                or region_boxes.shape[1] == 0
                or not bool(region_mask is None or region_mask.any())
            ):
                # Same modules on every rank and every step (ZeRO-3 gathers per module call, DDP
                # expects every trainable parameter in the graph): a dummy box, weighted 0.
                dummy = selected.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(selected.shape[0], 1, 4)
                feats = self.tower.region_features(selected, last, dummy)
                return embeds + 0.0 * self.region_connector()(feats).sum().to(embeds.dtype)
            if region_mask is None:
                region_mask = torch.ones(region_boxes.shape[:2], dtype=torch.bool, device=region_boxes.device)
            rmask = input_ids == self.config.region_token_id
            if int(rmask.sum()) != int(region_mask.sum()):
                raise ValueError(f"{int(rmask.sum())} <region> tokens for {int(region_mask.sum())} boxes")
            feats = self.tower.region_features(selected, last, region_boxes)
            regions = self.region_connector()(feats)[region_mask].to(embeds.dtype)
            embeds = embeds.masked_scatter(rmask[..., None].expand_as(embeds), regions)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        embeds = self.embed(input_ids, pixel_values, region_boxes, region_mask)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        use_cache: bool = True,
        streamer=None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding; returns only the new tokens [B, T_new]."""
        embeds = self.embed(input_ids, pixel_values, region_boxes, region_mask)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=use_cache,
            streamer=streamer,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )

    def enable_gradient_checkpointing(self) -> None:
        kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        self.llm.gradient_checkpointing_enable(**kw)
        if self.tower.config.trainable:
            self.tower.model.gradient_checkpointing_enable(**kw)


def build_model(config: MllmConfig, tokenizer) -> ClocLlava:
    """A fresh model from configs: tower from its folder, LLM from a folder or a config."""
    from clocmllm.mllm.tokenizer import IMAGE_TOKEN, REGION_TOKEN

    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.region_token_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    tower = VisionTower(config.tower)
    llm = build_llm(config.llm, vocab_size=len(tokenizer))
    if llm.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        llm.config.pad_token_id = tokenizer.pad_token_id
    return ClocLlava(config, llm, tower)
