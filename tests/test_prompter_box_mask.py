"""`prompter_box_mask`: box prompts attend only to the class token and the patches their box
overlaps, in JAX and in the exported PyTorch prompter alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from micro import save_random_checkpoint  # noqa: E402

from clocmllm.encoder.config import load_model_config  # noqa: E402
from clocmllm.encoder.models.clip import CLIP  # noqa: E402
from clocmllm.encoder.models.prompter import box_attention_bias  # noqa: E402


def _cfg(box_mask: bool):
    return load_model_config(
        "tiny", {"image_size": 32, "context_length": 8, "vocab_size": 64, "prompter_box_mask": box_mask}
    )


def _params(model):
    return jax.jit(lambda r: model.init(r, *model.dummy_inputs(1))["params"])(jax.random.key(0))


def test_jax_and_torch_bias_rules_agree():
    from clocmllm.mllm.prompter import box_attention_bias as torch_bias

    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, 1, (3, 5, 2, 2)), axis=2)  # sorted per coordinate
    boxes = corners.transpose(0, 1, 3, 2).reshape(3, 5, 4)[..., [0, 2, 1, 3]].astype(np.float32)
    boxes[0, 0] = 0.0  # a padded slot
    boxes[0, 1] = [0.25, 0.25, 0.5, 0.5]  # exactly on cell edges
    ours = np.asarray(box_attention_bias(jax.numpy.asarray(boxes), 8, 1))
    theirs = torch_bias(torch.from_numpy(boxes), 8, 1).numpy()
    np.testing.assert_array_equal(ours, theirs)
    # the box on cell edges covers exactly the 2x2 cells (2, 3) x (2, 3), zero-area contact excluded
    inside = (ours[0, 1, 1:] == 0).reshape(8, 8)
    assert inside.sum() == 4 and inside[2:4, 2:4].all()


@pytest.mark.parametrize("box_mask", [False, True])
def test_jax_region_embedding_ignores_patches_outside_the_box(box_mask):
    cfg = _cfg(box_mask)
    model = CLIP(cfg)
    params = _params(model)
    g = cfg.grid_size  # 4 at 32 px
    tokens = jax.random.normal(jax.random.key(1), (1, 1 + g * g, cfg.vision_width))
    boxes = jax.numpy.asarray([[[0.0, 0.0, 0.45, 0.45]]])  # the top-left 2x2 cells

    def embed(t):
        return np.asarray(model.apply({"params": params}, t, boxes, method="region_embed")[0])

    emb = embed(tokens)
    noise = np.asarray(jax.random.normal(jax.random.key(2), tokens.shape))
    cell = np.zeros((1, 1 + g * g, 1), np.float32)
    outside = cell.copy()
    outside[0, 1:, 0] = 1.0
    outside[0, 1:, 0].reshape(g, g)[:2, :2] = 0.0
    inside = cell.copy()
    inside[0, 1, 0] = 1.0  # cell (0, 0)
    assert not np.allclose(embed(tokens + noise * inside), emb)
    if box_mask:
        np.testing.assert_array_equal(embed(tokens + noise * outside), emb)
    else:
        assert not np.allclose(embed(tokens + noise * outside), emb)


def test_export_with_box_mask_passes_parity(tmp_path):
    from clocmllm.adapters.export import export_encoder

    save_random_checkpoint(tmp_path, _cfg(True))
    report = export_encoder(tmp_path / "wd", tmp_path / "hf", verbose=False)  # raises on a parity failure
    assert json.loads((tmp_path / "hf" / "prompter_config.json").read_text())["box_mask"] is True
    diffs = report["parity"]["diffs"]
    region = {k: v for k, v in diffs.items() if "region" in k or "ground" in k}
    assert region and max(region.values()) < 1e-4, diffs
