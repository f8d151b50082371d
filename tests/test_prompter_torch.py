"""The PyTorch prompter on its own (its match with the JAX prompter is in test_adapters_export)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from clocmllm.mllm.prompter import CONFIG_NAME, WEIGHTS_NAME, ClocPrompter, PrompterConfig, box_sinusoid


def _tiny(seed: int = 0) -> ClocPrompter:
    torch.manual_seed(seed)
    model = ClocPrompter(
        PrompterConfig(width=16, embed_dim=8, heads=2, mlp_dim=32, box_frequencies=[1.0, 2.0, 4.0])
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def test_box_sinusoid_layout():
    box = torch.tensor([[0.25, 0.3, 0.7, 1.0]])
    feats = box_sinusoid(box, torch.tensor([1.0, 2.0, 4.0]))
    assert feats.shape == (1, 2, 12)
    # corner 2, x coordinate, frequency 2 cycles: sin(2 pi 2 x2); the cos block follows the sins
    assert feats[0, 1, 1].item() == pytest.approx(math.sin(2 * math.pi * 2 * 0.7), abs=1e-5)
    assert feats[0, 1, 3 + 1].item() == pytest.approx(math.cos(2 * math.pi * 2 * 0.7), abs=1e-5)
    # y block after the x block: corner 1, y, 1 cycle
    assert feats[0, 0, 6].item() == pytest.approx(math.sin(2 * math.pi * 0.3), abs=1e-5)


def test_prompts_are_independent_and_shapes():
    model = _tiny()
    tokens = torch.randn(2, 5, 16)
    boxes = torch.rand(2, 3, 4)
    emb, feat = model(tokens, boxes)
    assert emb.shape == (2, 3, 8) and feat.shape == (2, 3, 16)
    # equal to running the block on each [image tokens ; 2 corner tokens] sequence on its own
    for i in range(2):
        for j in range(3):
            seq = torch.cat([tokens[i], model.box_embed(boxes[i, j])], dim=0)[None]
            feat_ij = model.ln(model.layer(seq)[0, -2:].mean(dim=0))
            torch.testing.assert_close(feat[i, j], feat_ij, rtol=0, atol=1e-5)
            torch.testing.assert_close(emb[i, j], model.proj(feat_ij), rtol=0, atol=1e-5)
    # changing one region (e.g. a padded slot) leaves the others' outputs bit-identical
    boxes2 = boxes.clone()
    boxes2[:, 2] = 0.0
    emb2, _ = model(tokens, boxes2)
    torch.testing.assert_close(emb2[:, :2], emb[:, :2], rtol=0, atol=1e-6)
    assert not torch.allclose(emb2[:, 2], emb[:, 2])
    # a region's embedding depends on its image
    emb3, _ = model(tokens.flip(0), boxes)
    assert not torch.allclose(emb3[0], emb[0])
    # grounding head maps features into (0, 1)
    pred = model.ground(feat)
    assert pred.shape == (2, 3, 4) and bool(((pred > 0) & (pred < 1)).all())
    text_emb, text_feat = model.text_prompt(tokens, torch.randn(2, 4, 8))
    assert text_emb.shape == (2, 4, 8) and text_feat.shape == (2, 4, 16)
    assert model.image_embed(tokens).shape == (2, 8)


def test_from_folder_round_trip(tmp_path):
    assert ClocPrompter.from_folder(tmp_path) is None  # a plain CLIP folder has no prompter
    model = _tiny(seed=1)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="half of the prompter"):
        ClocPrompter.from_folder(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / WEIGHTS_NAME))
    loaded = ClocPrompter.from_folder(tmp_path)
    tokens, boxes = torch.randn(1, 5, 16), torch.rand(1, 2, 4)
    torch.testing.assert_close(loaded(tokens, boxes)[0], model(tokens, boxes)[0], rtol=0, atol=0)
    # a missing tensor is an error naming it, never a silently random layer
    state = {k: v for k, v in model.state_dict().items() if k != "proj.weight"}
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="proj.weight"):
        ClocPrompter.from_folder(tmp_path)


def test_box_mask_bias_marks_the_overlapped_cells():
    from clocmllm.mllm.prompter import MASKED, box_attention_bias

    # 4x4 grid, one class token; x 0.1-0.3 overlaps columns 0 and 1 (0.3 > 0.25), y 0.5-0.75
    # overlaps row 2 only (0.75 is row 3's edge: zero-area contact does not count)
    bias = box_attention_bias(torch.tensor([[[0.1, 0.5, 0.3, 0.75], [0.0, 0.0, 0.0, 0.0]]]), 4, 1)
    allowed = (bias == 0)[0]
    assert bias.shape == (1, 2, 17) and bool(allowed[:, 0].all())  # class token always allowed
    assert allowed[0, 1:].reshape(4, 4).int().tolist() == [
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
    ]
    assert not bool(allowed[1, 1:].any())  # an empty (padded) box sees the class token only
    assert set(bias.unique().tolist()) == {0.0, MASKED}


@pytest.mark.parametrize("box_mask", [False, True])
def test_box_mask_makes_region_embeddings_ignore_patches_outside_the_box(box_mask):
    torch.manual_seed(1)
    cfg = PrompterConfig(
        width=16, embed_dim=8, heads=2, mlp_dim=32, box_frequencies=[1.0, 2.0],
        image_size=32, patch_size=8, box_mask=box_mask,
    )  # fmt: skip
    model = ClocPrompter(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    tokens = torch.randn(1, 1 + 16, 16)
    boxes = torch.tensor([[[0.0, 0.0, 0.45, 0.45]]])  # covers the top-left 2x2 cells
    emb, _ = model(tokens, boxes)
    outside = tokens.clone()
    grid = outside[:, 1:].reshape(1, 4, 4, 16)
    grid[:, 2:, :] += 3.0 * torch.randn(16)  # rows 2-3 and columns 2-3: every cell outside
    grid[:, :, 2:] += 3.0 * torch.randn(16)
    emb2, _ = model(outside, boxes)
    inside = tokens.clone()
    inside[:, 1 + 0] += 3.0 * torch.randn(16)  # cell (0, 0), inside the box
    emb3, _ = model(inside, boxes)
    assert not torch.allclose(emb3, emb)
    probs = model.box_attention(tokens, boxes)  # what scripts/probe_prompter_attention.py reads
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    patches = probs[0, 0, ..., 1:17].reshape(*probs.shape[2:4], 4, 4)
    if box_mask:
        torch.testing.assert_close(emb2, emb, rtol=0, atol=0)
        assert patches[..., 2:, :].abs().max() == 0 and patches[..., :, 2:].abs().max() == 0
    else:
        assert not torch.allclose(emb2, emb)
        assert patches[..., 2:, :].min() > 0
