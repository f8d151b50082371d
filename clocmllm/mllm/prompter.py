"""The CLOC prompter and grounding head in PyTorch, mirroring `clocmllm.encoder.models.clip`.

An exported encoder folder is a plain `CLIPVisionModel` plus `prompter.safetensors` and
`prompter_config.json` (written by `clocmllm.adapters.export`). This module rebuilds the
part that is not a `CLIPVisionModel` from those two files: the box / text prompter, the
grounding head, and the image head (post-layernorm + visual projection) so image and region
embeddings land in the same space. The math is the JAX model's, op for op; the export's
parity check holds the two to fp32 max abs diff <= 1e-4.

Input convention: `image_tokens` is the vision tower's `last_hidden_state` `[B, 1+N, Dv]`
(tokens after the last block, before post-layernorm) and boxes are `[x1, y1, x2, y2]` in
[0, 1] of the model's padded square (`clocmllm.boxes.Letterbox.to_unit`).

No jax import here: the PyTorch side must run without JAX installed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "prompter_config.json"
WEIGHTS_NAME = "prompter.safetensors"


@dataclass
class PrompterConfig:
    """Sizes of the prompter; written to `prompter_config.json` by the exporter."""

    width: int  # ViT width Dv
    embed_dim: int  # CLIP embedding size E
    heads: int = 1
    mlp_dim: int = 3072
    # Cycles per unit side of the box sinusoid, stored as numbers (not a rule) so the
    # PyTorch side cannot drift from the JAX `box_frequencies` that trained the weights.
    box_frequencies: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    hidden_act: str = "quick_gelu"  # activation of the prompter's transformer block
    layer_norm_eps: float = 1e-5
    image_size: int = 224
    patch_size: int = 16
    class_token: bool = True
    # Box prompts attend only to the class token and the patches their box overlaps
    # (the JAX `ModelConfig.prompter_box_mask`; `box_attention_bias` below).
    box_mask: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> PrompterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format", "version"})
        if unknown:
            raise ValueError(f"{source}: unknown prompter config field(s) {unknown}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        return {"format": "clocmllm-prompter", "version": 1, **asdict(self)}


def activation(name: str):
    """The block activations of the JAX model (HF names): quick_gelu and exact-erf gelu."""
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: F.gelu(x, approximate="none")
    raise ValueError(f"unknown activation {name!r}")


def box_sinusoid(boxes: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """`[..., 4]` boxes in [0, 1] -> `[..., 2, 4F]` sinusoid features of the two corners.

    Per corner (x, y) and frequency f (cycles per side, `PrompterConfig.box_frequencies`):
    [sin(2 pi f x) for f, cos(2 pi f x) for f, sin(2 pi f y) for f, cos(2 pi f y) for f],
    computed in the JAX model's operation order so fp32 results match.
    """
    corners = boxes.reshape(*boxes.shape[:-1], 2, 2)  # [..., corner, (x, y)]
    angles = 2 * math.pi * corners[..., None] * frequencies.to(corners.dtype)  # [..., 2, 2, F]
    feats = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # [..., 2, 2, 2F]
    return feats.reshape(*feats.shape[:-2], -1)


MASKED = -1e9  # finite, as in JAX: exp underflows to exactly 0


def box_attention_bias(boxes: torch.Tensor, grid: int, leading: int) -> torch.Tensor:
    """boxes [B, M, 4] in [0, 1] -> additive bias [B, M, leading + grid**2] on the image
    tokens: 0 for the leading (class) tokens and the patches whose cell overlaps the box with
    positive area, MASKED for the others (JAX `box_attention_bias`, same rule)."""
    edges = torch.arange(grid, dtype=torch.float32, device=boxes.device) / grid
    b = boxes.float()
    cols = (b[..., 0:1] < edges + 1.0 / grid) & (b[..., 2:3] > edges)  # [B, M, G]
    rows = (b[..., 1:2] < edges + 1.0 / grid) & (b[..., 3:4] > edges)
    inside = (rows[..., :, None] & cols[..., None, :]).reshape(*boxes.shape[:-1], grid * grid)
    lead = torch.ones(*boxes.shape[:-1], leading, dtype=torch.bool, device=boxes.device)
    allowed = torch.cat([lead, inside], dim=-1)
    return torch.where(allowed, 0.0, MASKED).to(torch.float32)


class BoxEmbed(nn.Module):
    """A box -> two prompt tokens (one a corner): sinusoid -> Linear -> + corner-type embedding."""

    def __init__(self, width: int, frequencies: list[float]):
        super().__init__()
        self.register_buffer("frequencies", torch.tensor(frequencies, dtype=torch.float32), persistent=False)
        self.dense = nn.Linear(4 * len(frequencies), width)
        self.corner_embed = nn.Parameter(torch.zeros(2, width))

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.dense(box_sinusoid(boxes, self.frequencies)) + self.corner_embed


class Attention(nn.Module):
    """Unmasked multi-head self-attention with HF CLIPAttention names (q/k/v/out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax((q * (d // h) ** -0.5) @ k.transpose(-1, -2), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out)


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block, HF CLIPEncoderLayer math and names."""

    def __init__(self, cfg: PrompterConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class GroundingHead(nn.Module):
    """2-layer MLP with GELU (exact erf) on the prompter feature -> sigmoid box in [0, 1]."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, 4)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.gelu(self.fc1(feat), approximate="none")))


class ClocPrompter(nn.Module):
    """Box- and text-prompted region embeddings on top of a CLIP vision tower's tokens."""

    def __init__(self, cfg: PrompterConfig):
        super().__init__()
        self.config = cfg
        self.box_embed = BoxEmbed(cfg.width, cfg.box_frequencies)
        self.text_in = nn.Linear(cfg.embed_dim, cfg.width)
        self.layer = Block(cfg)
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.ground_head = GroundingHead(cfg.width)
        # The image head, so image and region embeddings share one space.
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.visual_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu") -> ClocPrompter | None:
        """Load from an exported folder; None when it holds no prompter (e.g. a stock CLIP)."""
        folder = Path(folder)
        cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not cfg_path.exists() and not weights_path.exists():
            return None
        for path in (cfg_path, weights_path):
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing (the folder has only half of the prompter)")
        from safetensors.torch import load_file

        cfg = PrompterConfig.from_dict(json.loads(cfg_path.read_text()), source=str(cfg_path))
        model = cls(cfg)
        state = load_file(str(weights_path), device=str(device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected}")
        return model.to(device).eval()

    # ------------------------------------------------------------------ heads
    def _attention(
        self, image_tokens: torch.Tensor, prompt: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's attention weights for the prompt tokens, [B, M, H, P, T + P] (image keys,
        then the prompt's own), and the values they weigh: image [B, 1, H, T, Dh], own
        [B, M, H, P, Dh]."""
        layer, attn = self.layer, self.layer.self_attn
        h = attn.heads
        dh = prompt.shape[-1] // h
        # compute in the prompter's own dtype (a bf16 tower may feed an fp32 prompter)
        tokens = image_tokens.to(prompt.dtype)

        def heads(x: torch.Tensor) -> torch.Tensor:  # [..., L, D] -> [..., H, L, Dh]
            return x.reshape(*x.shape[:-1], h, dh).transpose(-2, -3)

        hi, hp = layer.layer_norm1(tokens), layer.layer_norm1(prompt)
        q = heads(attn.q_proj(hp)) * dh**-0.5  # [B, M, H, P, Dh]
        k_own, v_own = heads(attn.k_proj(hp)), heads(attn.v_proj(hp))  # [B, M, H, P, Dh]
        k_img, v_img = heads(attn.k_proj(hi))[:, None], heads(attn.v_proj(hi))[:, None]  # [B, 1, H, T, Dh]
        l_img = q @ k_img.transpose(-1, -2)
        if bias is not None:  # [B, M, T] on the image keys
            l_img = l_img + bias[:, :, None, None, :].to(l_img.dtype)
        probs = torch.softmax(torch.cat([l_img, q @ k_own.transpose(-1, -2)], dim=-1), dim=-1)
        return probs, v_img, v_own

    def _box_bias(self, boxes: torch.Tensor, n_tokens: int) -> torch.Tensor | None:
        if not self.config.box_mask:
            return None
        g = self.config.grid
        return box_attention_bias(boxes, g, n_tokens - g * g)

    def box_attention(self, image_tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Where box prompts look: attention weights [B, M, H, 2, T + 2] of the two corner
        tokens over the image tokens and themselves (scripts/probe_prompter_attention.py)."""
        prompt = self.box_embed(boxes.to(self.box_embed.dense.weight.dtype))
        return self._attention(image_tokens, prompt, self._box_bias(boxes, image_tokens.shape[1]))[0]

    def _prompted(
        self, image_tokens: torch.Tensor, prompt: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T, Dv] + prompt tokens [B, M, P, Dv] -> (emb [B, M, E], feat [B, M, Dv]).

        Each (image, prompt) pair is its own sequence [image tokens ; prompt tokens], so padded
        prompts cannot affect others; pooling is the mean over the P prompt-token outputs only.
        Only those outputs are computed, against image keys/values computed once per image (the
        image tokens' own outputs are never read), as the JAX `Block.with_prefix` does: the same
        numbers as running the block on M concatenated sequences, without copying the image
        tokens M times.
        """
        b, m, p, d = prompt.shape
        layer, attn = self.layer, self.layer.self_attn
        probs, v_img, v_own = self._attention(image_tokens, prompt, bias)
        t = v_img.shape[-2]
        out = probs[..., :t] @ v_img + probs[..., t:] @ v_own  # [B, M, H, P, Dh]
        x = prompt + attn.out_proj(out.transpose(-2, -3).reshape(b, m, p, d))
        x = x + layer.mlp(layer.layer_norm2(x))
        feat = self.ln(x.mean(dim=2))
        return self.proj(feat), feat

    def forward(self, image_tokens: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box prompts: boxes `[B, M, 4]` in [0, 1] -> (emb [B, M, E], feat [B, M, Dv])."""
        if boxes.shape[-1] != 4 or boxes.dim() != 3:
            raise ValueError(f"boxes must be [B, M, 4], got {tuple(boxes.shape)}")
        prompt = self.box_embed(boxes.to(self.box_embed.dense.weight.dtype))
        return self._prompted(image_tokens, prompt, self._box_bias(boxes, image_tokens.shape[1]))

    def text_prompt(
        self, image_tokens: torch.Tensor, text_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text prompts: CLIP text embeddings `[B, M, E]` -> (emb [B, M, E], feat [B, M, Dv])."""
        prompt = self.text_in(text_emb.to(self.text_in.weight.dtype))[:, :, None]
        return self._prompted(image_tokens, prompt)

    def ground(self, feat: torch.Tensor) -> torch.Tensor:
        """Prompter features `[B, M, Dv]` -> boxes `[B, M, 4]` in [0, 1]."""
        return self.ground_head(feat.to(self.ground_head.fc1.weight.dtype))

    def image_embed(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embedding: post-layernorm of the class token, then projection."""
        cls = image_tokens[:, 0].to(self.visual_projection.weight.dtype)
        return self.visual_projection(self.post_layernorm(cls))
