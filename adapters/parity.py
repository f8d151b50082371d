"""Parity of an exported folder against the JAX model it came from.

Metric (fp32): `diff(a, b) = max_i |a_i - b_i| / max(1, |b_i|)` where b is the JAX value, i.e.
the absolute error for values of magnitude <= 1 and the relative error above 1 (deep ViT
residual streams reach magnitudes of tens to hundreds, where 1e-4 absolute is below fp32
resolution after 24 blocks of accumulation-order differences). An export passes when every
compared output has diff <= 1e-4.

Compared outputs, on the same random and real images (`skimage.data`) and boxes:
`last_hidden_state`, `hidden_states[-2]` (what LLaVA reads), the pooled image embedding,
box-prompted region embeddings and features, a text-prompted region embedding and the
grounding head's boxes. The PyTorch side runs its own tower, so prompter diffs include the
tower's: that is the error a user of the folder sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TOLERANCE = 1e-4
REAL_IMAGES = ("astronaut", "coffee", "chelsea")


def max_diff(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))))


def parity_inputs(
    image_size: int, embed_dim: int, n_random: int = 1, real: tuple[str, ...] = REAL_IMAGES, seed: int = 0
) -> dict[str, Any]:
    """Normalised images [B, S, S, 3] (random + letterboxed real photos), boxes, text embeddings."""
    from PIL import Image

    from clocmllm.encoder.preprocess import preprocess_image

    try:  # scikit-image ships these photos (no download); it is a dev extra, so optional here
        from skimage import data as skdata
    except ModuleNotFoundError:
        skdata, n_random, real = None, n_random + len(real), ()
    rng = np.random.default_rng(seed)
    images = [rng.standard_normal((image_size, image_size, 3)).astype(np.float32) for _ in range(n_random)]
    for name in real:
        images.append(preprocess_image(Image.fromarray(getattr(skdata, name)()), image_size)[0])
    b = len(images)
    fixed = np.asarray([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.5, 0.9], [0.6, 0.05, 0.95, 0.4]], np.float32)
    corner = np.sort(rng.uniform(0, 1, (b, 2, 2, 2)), axis=2)  # [b, box, (lo, hi), (x, y)]
    rand_boxes = np.stack(
        [corner[:, :, 0, 0], corner[:, :, 0, 1], corner[:, :, 1, 0], corner[:, :, 1, 1]], -1
    )
    boxes = np.concatenate([np.broadcast_to(fixed, (b, 3, 4)), rand_boxes.astype(np.float32)], axis=1)
    text_emb = rng.standard_normal((b, 2, embed_dim)).astype(np.float32)
    return {
        "images": np.stack(images),
        "image_names": [f"random{i}" for i in range(n_random)] + list(real),
        "boxes": np.ascontiguousarray(boxes),
        "text_emb": text_emb,
    }


def text_inputs(cfg: Any, batch: int = 3, seed: int = 0) -> np.ndarray:
    """Token rows with an EOT at different positions (and pad after it), for text parity."""
    rng = np.random.default_rng(seed)
    t = cfg.context_length
    ids = rng.integers(0, cfg.vocab_size, (batch, t))
    ids[ids == cfg.eot_token_id] = (cfg.eot_token_id + 1) % cfg.vocab_size
    for row in range(batch):
        end = int(rng.integers(1, t))
        ids[row, end] = cfg.eot_token_id
        ids[row, end + 1 :] = cfg.pad_token_id
    return ids.astype(np.int32)


def jax_outputs(cfg: Any, params: dict, inputs: dict, token_ids: np.ndarray | None = None) -> dict:
    """Reference outputs of the JAX model (float32 compute)."""
    import jax
    import jax.numpy as jnp

    from clocmllm.encoder.models.clip import CLIP

    cfg = cfg.replace(dtype="float32", remat=False)
    model = CLIP(cfg)

    # One jit over everything: eager linen dispatch costs more than compiling, even for tiny.
    @jax.jit
    def run(params, images, boxes, text_emb, token_ids):
        v = {"params": params}
        states = model.apply(v, images, True, method="encode_image_tokens")
        tokens = states[-1]
        emb, feat = model.apply(v, tokens, boxes, method="region_embed")
        t_emb, t_feat = model.apply(v, tokens, text_emb, method="text_prompt_embed")
        out = {
            "last_hidden_state": tokens,
            "hidden_states[-2]": states[-2],
            "image_embeds": model.apply(v, tokens, method="pool_image"),
            "region_emb": emb,
            "region_feat": feat,
            "text_prompt_emb": t_emb,
            "ground_boxes": model.apply(v, t_feat, method="ground"),
        }
        if token_ids is not None:
            out["text_embeds"] = model.apply(v, token_ids, method="encode_text")
        return out

    out = run(
        params,
        jnp.asarray(inputs["images"]),
        jnp.asarray(inputs["boxes"]),
        jnp.asarray(inputs["text_emb"]),
        None if token_ids is None else jnp.asarray(token_ids),
    )
    return {k: np.asarray(x) for k, x in out.items()}


def torch_outputs(
    folder: Path, inputs: dict, token_ids: np.ndarray | None = None, text_folder: Path | None = None
) -> dict:
    """The same outputs from the exported folder, through transformers and `ClocPrompter`."""
    import torch
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPVisionModel

    from clocmllm.mllm.prompter import ClocPrompter

    config = (folder / "config.json").read_text()
    full = '"model_type": "clip"' in config
    with torch.no_grad():
        if full:
            clip = CLIPModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
            tower, text_model = clip.vision_model, clip
        else:
            tower = CLIPVisionModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
            text_model = None
            if text_folder is not None:
                text_model = CLIPTextModelWithProjection.from_pretrained(
                    str(text_folder), torch_dtype=torch.float32
                ).eval()
        pixels = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2).contiguous()
        vis = tower(pixel_values=pixels, output_hidden_states=True)
        tokens = vis.last_hidden_state
        prompter = ClocPrompter.from_folder(folder)
        if prompter is None:
            raise FileNotFoundError(f"{folder}: no prompter files")
        emb, feat = prompter(tokens, torch.from_numpy(inputs["boxes"]))
        t_emb, t_feat = prompter.text_prompt(tokens, torch.from_numpy(inputs["text_emb"]))
        out = {
            "last_hidden_state": tokens,
            "hidden_states[-2]": vis.hidden_states[-2],
            "image_embeds": prompter.image_embed(tokens),
            "region_emb": emb,
            "region_feat": feat,
            "text_prompt_emb": t_emb,
            "ground_boxes": prompter.ground(t_feat),
        }
        if full:
            out["image_embeds_clipmodel"] = clip.get_image_features(pixel_values=pixels)
        if token_ids is not None and text_model is not None:
            ids = torch.from_numpy(token_ids.astype(np.int64))
            if full:
                out["text_embeds"] = text_model.get_text_features(input_ids=ids)
            else:
                out["text_embeds"] = text_model(input_ids=ids).text_embeds
    result = {}
    for k, x in out.items():
        if not isinstance(x, torch.Tensor):  # transformers 5 may return an output object
            x = getattr(x, "pooler_output", None)
            if x is None:
                continue
        result[k] = x.detach().float().numpy()
    return result


def compare(ref: dict, got: dict) -> dict[str, float]:
    """Diff per output; an output missing on the PyTorch side is an infinite diff."""
    diffs = {}
    for name, value in ref.items():
        diffs[name] = max_diff(got[name], value) if name in got else float("inf")
    if "image_embeds_clipmodel" in got:
        diffs["image_embeds_clipmodel"] = max_diff(got["image_embeds_clipmodel"], ref["image_embeds"])
    return diffs
