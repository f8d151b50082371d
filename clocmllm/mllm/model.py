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

Proposal grounding (`proposer`, off by default; `proposer.py`): the prompt lists K candidate
tokens `<r0> ... <rK-1>` after the image; the first occurrence of each in a sample gets the
region feature of its proposal box (through the region connector) added to its own
embedding, so one token carries both the candidate's name and what it shows. Later
occurrences (the answer naming a candidate) are plain tokens, in training as in generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from clocmllm.mllm.connector import build_connector
from clocmllm.mllm.patch_position import PatchPosition, check_mode
from clocmllm.mllm.pointer import CandidatePointer, add_pointer_logits, first_positions
from clocmllm.mllm.proposer import BoxProposer, ProposerConfig
from clocmllm.mllm.templates import CANDIDATE_POSITIONS, IMAGE_POSITIONS
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
    proposer: dict | None = None  # ProposerConfig as a dict: proposal grounding on (proposer.py)
    candidate_token_ids: list[int] = field(default_factory=list)  # <r0>..<rK-1>, set by build_model
    candidate_position: str = "after_image"  # after_image | after_prompt (templates.insert_candidates)
    candidate_pointer: bool = True  # with a proposer: pointer logits for the names (pointer.py)

    def __post_init__(self) -> None:
        if isinstance(self.tower, dict):
            self.tower = TowerConfig(**self.tower)
        if self.regions not in REGION_MODES:
            raise ValueError(f"model.regions must be one of {REGION_MODES}, got {self.regions!r}")
        check_mode(self.connector_pos)
        if self.candidate_position not in CANDIDATE_POSITIONS:
            raise ValueError(
                f"model.candidate_position must be one of {CANDIDATE_POSITIONS}, got {self.candidate_position!r}"
            )
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
                config.connector_pos, tower.token_grid, width, has_cls=tower.config.feature == "cls_patch"
            )
            if config.connector_pos != "none"
            else None
        )
        self.proposer = None
        if config.proposer:
            if not self.uses_regions:
                raise ValueError("model.proposer needs region features: model.regions must not be 'none'")
            self.proposer = BoxProposer(ProposerConfig(**config.proposer)).requires_grad_(False)
            pc = self.proposer.config
            if (pc.grid, pc.dim) != (tower.grid, tower.hidden_size):
                raise ValueError(
                    f"model.proposer: trained for a {pc.grid}x{pc.grid} grid of width {pc.dim}, but the tower "
                    f"has {tower.grid}x{tower.grid} of width {tower.hidden_size} (train it on this tower)"
                )
            if len(config.candidate_token_ids) != pc.k:
                raise ValueError(
                    f"model.proposer: k={pc.k} but {len(config.candidate_token_ids)} candidate tokens"
                )
        self.pointer = (
            CandidatePointer(width) if self.proposer is not None and config.candidate_pointer else None
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
        candidate_boxes: torch.Tensor | None = None,
        extras: dict | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features (and region features) written in.

        `extras`, when given, receives where the prompt's candidates are, when they were embedded
        (`"slots"`: `pointer.first_positions`), so the pointer does not look for them again."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        selected, last = self.tower(pixel_values)
        image = self.projector(self.tower.image_tokens(selected))
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
        if self.proposer is not None and candidate_boxes is not None:
            slots = first_positions(input_ids, self.config.candidate_token_ids)
            if extras is not None:
                extras["slots"] = slots
            feats = self.region_connector()(self.tower.region_features(selected, last, candidate_boxes))
            # candidate k's connected region feature at the first `<rk>` of a sample, else 0
            embeds = embeds + torch.einsum("btk,bkw->btw", slots[0].to(feats.dtype), feats).to(embeds.dtype)
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
        candidate_boxes: torch.Tensor | None = None,
        candidate_scores: torch.Tensor | None = None,
        **kwargs,
    ):
        extras: dict = {}
        embeds = self.embed(input_ids, pixel_values, region_boxes, region_mask, candidate_boxes, extras)
        if self.pointer is None or "slots" not in extras:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        out, hidden = self._llm_with_hidden(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        first, cand_pos = extras["slots"]
        cand = torch.einsum("btk,btw->bkw", first.to(hidden.dtype), hidden)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        out.logits = add_pointer_logits(
            out.logits, self.pointer(hidden, cand, candidate_scores), self.config.candidate_token_ids,
            positions, cand_pos,
        )  # fmt: skip
        if labels is not None:
            out.loss = nn.functional.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return out

    def _llm_with_hidden(self, **kwargs):
        """The LLM's output and the hidden states its LM head reads (any causal LM: a hook)."""
        seen: list[torch.Tensor] = []
        hook = self.llm.get_output_embeddings().register_forward_pre_hook(
            lambda _m, args: seen.append(args[0])
        )
        try:
            out = self.llm(**kwargs)
        finally:
            hook.remove()
        return out, seen[-1]

    @torch.no_grad()
    def _generate_pointer(
        self,
        input_ids,
        embeds,
        slots,
        scores,
        attention_mask,
        max_new_tokens,
        use_cache,
        streamer,
        eos_token_id,
    ) -> torch.Tensor:
        """Greedy decoding with pointer logits (HF `generate` cannot add them): KV cache or not."""
        if not bool(attention_mask.all()):
            raise ValueError("generate with a candidate pointer: padded prompts are not supported")
        ids = self.config.candidate_token_ids
        first, cand_pos = slots
        out, hidden = self._llm_with_hidden(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=use_cache
        )
        cand = torch.einsum("btk,btw->bkw", first.to(hidden.dtype), hidden)
        embed_tokens = self.llm.get_input_embeddings()
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new: list[torch.Tensor] = []
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            t = embeds.shape[1] - 1
            logits = add_pointer_logits(
                out.logits[:, -1:], self.pointer(hidden[:, -1:], cand, scores), ids,
                torch.tensor([t], device=input_ids.device), cand_pos,
            )  # fmt: skip
            nxt = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            new.append(nxt)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            step = embed_tokens(nxt)[:, None]
            embeds = torch.cat([embeds, step], 1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(nxt), 1)], 1)
            if use_cache:
                out, h = self._llm_with_hidden(
                    inputs_embeds=step, attention_mask=attention_mask,
                    past_key_values=out.past_key_values, use_cache=True,
                )  # fmt: skip
            else:
                out, h = self._llm_with_hidden(
                    inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
                )
            hidden = h[:, -1:]
        if streamer is not None:
            streamer.end()
        return torch.stack(new, 1) if new else input_ids.new_zeros(len(input_ids), 0)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        candidate_boxes: torch.Tensor | None = None,
        candidate_scores: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        use_cache: bool = True,
        streamer=None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding; returns only the new tokens [B, T_new]."""
        extras: dict = {}
        embeds = self.embed(input_ids, pixel_values, region_boxes, region_mask, candidate_boxes, extras)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if self.pointer is not None and "slots" in extras:
            return self._generate_pointer(
                input_ids, embeds, extras["slots"], candidate_scores, attention_mask, max_new_tokens, use_cache,
                streamer, eos_token_id,
            )  # fmt: skip
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
    """A fresh model from configs: tower from its folder, LLM from a folder or a config.

    With `config.proposer`, the candidate tokens join the tokenizer (before the LLM is sized);
    the proposer's weights are the caller's to load (`model.proposer.load_state_dict`).
    """
    from clocmllm.mllm.tokenizer import IMAGE_TOKEN, REGION_TOKEN, ensure_candidate_tokens

    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.region_token_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    if config.proposer:
        config.candidate_token_ids = ensure_candidate_tokens(tokenizer, int(config.proposer["k"]))
    tower = VisionTower(config.tower)
    llm = build_llm(config.llm, vocab_size=len(tokenizer))
    if llm.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        llm.config.pad_token_id = tokenizer.pad_token_id
    return ClocLlava(config, llm, tower)
