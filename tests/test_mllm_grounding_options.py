"""Options for grounding with a from-scratch LLM (docs/mllm.md, docs/demo.md Tuning log).

`model.connector_pos`: a (row, col) embedding on the image tokens; saved, reloaded, never stock.
`model.image_position`: `<image>` after the first question instead of before it.
`model.tower.pool`: k x k patches averaged into one image token; never stock.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("transformers")

from clocmllm.mllm import templates, tiny
from clocmllm.mllm.dataset import ConversationDataset, collate
from clocmllm.mllm.inference import answer, user_text
from clocmllm.mllm.model import MllmConfig, build_model
from clocmllm.mllm.patch_position import sincos_2d
from clocmllm.mllm.save import load_model, save_model, to_legacy_llava
from clocmllm.mllm.tokenizer import IMAGE_TOKEN, build_tokenizer

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm_pos")
    tower = tiny.make_tower_folder(root / "tower")
    data = tiny.make_conversations(root / "data", n=4, size=(96, 64))  # letterboxed: padding patches
    tok = build_tokenizer(tiny.conversation_texts(data))
    return root, tower, data, tok


def _model(world, pos: str, feature: str = "patch", regions: str = "none", image_position: str = "first"):
    _, tower, _, tok = world
    torch.manual_seed(0)
    cfg = MllmConfig(
        tower={"path": str(tower), "feature": feature},
        regions=regions,
        template="v1",
        connector_pos=pos,
        image_position=image_position,
        llm={"config": tiny.llm_config()},
    )
    return build_model(cfg, tok).eval()


def test_sincos_2d_encodes_row_and_column():
    table = sincos_2d(4, 16)
    assert table.shape == (16, 16)
    assert len({tuple(r.tolist()) for r in table.round(decimals=5)}) == 16  # every patch distinct
    # first half depends on the row only, second half on the column only (row-major order)
    assert torch.equal(table[1, :8], table[2, :8]) and not torch.equal(table[1, 8:], table[2, 8:])
    assert torch.equal(table[1, 8:], table[5, 8:]) and not torch.equal(table[1, :8], table[5, :8])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 18)


@pytest.mark.parametrize("pos", ["sincos2d", "learned"])
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_position_is_added_to_patches_only(world, pos, feature):
    model = _model(world, pos, feature)
    base = _model(world, "none", feature)
    base.load_state_dict(model.state_dict(), strict=False)  # same weights, no position
    grid = model.tower.grid
    pixels = torch.randn(2, 3, model.tower.image_size, model.tower.image_size)
    with torch.no_grad():
        selected, _ = model.tower(pixels)
        plain = base.projector(selected)
        added = model.patch_position(model.projector(selected)) - plain
    assert added.shape == (2, grid * grid + (feature == "cls_patch"), plain.shape[-1])
    patches = added[:, 1:] if feature == "cls_patch" else added
    if feature == "cls_patch":
        assert added[:, 0].abs().max() == 0  # the class token has no grid position
    assert torch.allclose(patches[0], patches[1], atol=1e-6)  # depends on position, not on the image
    assert len({tuple(r.round(decimals=4).tolist()) for r in patches[0]}) == grid * grid


def test_position_changes_logits_and_trains(world):
    _, _, data, tok = world
    model = _model(world, "sincos2d")
    ds = ConversationDataset(data, tok, model.tower, template="v1")
    batch = collate([ds[1], ds[3]], tok.pad_token_id)
    with torch.no_grad():
        with_pos = model(**batch).logits
        model.patch_position.gain.fill_(0.0)
        without = model(**batch).logits
        model.patch_position.gain.fill_(1.0)
    assert (with_pos - without).abs().max() > 1e-4
    model.train()
    model(**batch).loss.backward()
    assert model.patch_position.gain.grad is not None and model.patch_position.gain.grad.abs() > 0


@pytest.mark.parametrize("pos", ["sincos2d", "learned"])
def test_round_trip_and_stock_export_refused(world, pos, tmp_path):
    _, _, data, tok = world
    model = _model(world, pos)
    with torch.no_grad():  # a trained-looking, non-default position state
        if pos == "learned":
            model.patch_position.table.mul_(3.0)
        else:
            model.patch_position.gain.fill_(0.25)
    # the same model without a position would be a stock folder: the position is what forbids it
    with pytest.raises(ValueError, match="connector_pos"):
        save_model(model, tok, tmp_path / "stock", kind="stock")
    with pytest.raises(ValueError, match="connector_pos"):
        to_legacy_llava(model)
    assert not (tmp_path / "stock").exists()
    assert save_model(model, tok, tmp_path / "own") == "clocmllm"
    loaded, _ = load_model(tmp_path / "own")
    assert loaded.config.connector_pos == pos
    ds = ConversationDataset(data, tok, model.tower, template="v1")
    batch = collate([ds[0], ds[1]], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    plain = _model(world, "none")
    assert save_model(plain, tok, tmp_path / "plain", kind="stock") == "stock"


def test_unknown_mode_is_refused(world):
    with pytest.raises(ValueError, match="connector_pos"):
        _model(world, "rope")


# ---- image_position -------------------------------------------------------------------------
def test_place_image():
    q = "<image>\nWhere is the red circle?"
    assert templates.place_image(q, "after_prompt") == "Where is the red circle?\n<image>"
    assert templates.place_image(q, "first") == q
    assert templates.place_image("Where?", "first") == "<image>\nWhere?"
    assert user_text("Where?", None, True, "after_prompt") == "Where?\n<image>"
    assert user_text("Where?", None, False, "after_prompt") == "Where?"  # later turns: no image
    with pytest.raises(ValueError, match="image_position"):
        templates.place_image(q, "last")


def test_image_after_prompt_in_training_and_inference(world, tmp_path):
    root, _, data, tok = world
    model = _model(world, "sincos2d", regions="shared", image_position="after_prompt")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    first = ConversationDataset(data, tok, model.tower, template="v1")
    after = ConversationDataset(data, tok, model.tower, template="v1", image_position="after_prompt")
    for a, b in zip(first.samples, after.samples, strict=True):
        ia = [i for i, t in enumerate(a.input_ids) if t == image_id]
        ib = [i for i, t in enumerate(b.input_ids) if t == image_id]
        assert len(ia) == len(ib) == model.tower.num_tokens
        assert ib[0] > ia[0]  # the question now comes before the image
        assert sorted(a.input_ids) == sorted(b.input_ids)  # same tokens, moved
        assert [t for t in a.labels if t >= 0] == [t for t in b.labels if t >= 0]  # same targets
        assert a.region_boxes == b.region_boxes
    batch = collate([after[0], after[1]], tok.pad_token_id)  # a referring sample: regions still fit
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    save_model(model, tok, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.image_position == "after_prompt"
    from PIL import Image

    image = Image.open(data.parent / "images" / "0001.png").convert("RGB")
    a = answer(model, tok, image, "where is the red circle?", max_new_tokens=4)
    b = answer(loaded, tok, image, "where is the red circle?", max_new_tokens=4)
    assert a.text == b.text


# ---- token_loss_weights ------------------------------------------------------------------
def test_token_loss_weights(world):
    from clocmllm.mllm.token_weights import weight_table, weighted_loss

    _, _, data, tok = world
    model = _model(world, "none")
    ds = ConversationDataset(data, tok, model.tower, template="v1")
    batch = collate([ds[0], ds[1], ds[2]], tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    ones = torch.ones(len(tok))
    torch.testing.assert_close(weighted_loss(out.logits, batch["labels"], ones), out.loss)
    # weight 0 on every token but one kind = the mean cross-entropy over that kind only
    eos = tok.eos_token_id
    only_eos = weight_table(tok, {"^</s>$": 1.0, ".": 0.0})
    assert only_eos[eos] == 1 and only_eos.sum() == 1
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none"
    )
    want = ce[labels == eos].mean()
    torch.testing.assert_close(weighted_loss(out.logits, batch["labels"], only_eos), want)
    with pytest.raises(ValueError, match="token_loss_weights"):
        weight_table(tok, {"[": 0.5})


# ---- tower.pool ------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["none", "sincos2d"])
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_pool_averages_patch_blocks_for_the_llm_only(world, feature, pos, tmp_path):
    """`model.tower.pool: 2`: the LLM sees each 2x2 block of patches as one token (the class
    token kept as is); region features still read the full grid; data, model (with a patch
    position on the pooled grid) and save agree."""
    _, tower, data, tok = world
    torch.manual_seed(0)
    cfg = MllmConfig(
        tower={"path": str(tower), "feature": feature, "pool": 2}, regions="shared", template="v1",
        connector_pos=pos, llm={"config": tiny.llm_config()},
    )  # fmt: skip
    model = build_model(cfg, tok).eval()
    g, lead = model.tower.grid, int(feature == "cls_patch")
    assert model.tower.num_tokens == (g // 2) ** 2 + lead
    if pos != "none":
        assert model.patch_position.grid == g // 2
    pixels = torch.randn(1, 3, model.tower.image_size, model.tower.image_size)
    with torch.no_grad():
        selected, last = model.tower(pixels)
    pooled = model.tower.image_tokens(selected)
    assert pooled.shape == (1, model.tower.num_tokens, selected.shape[-1])
    grid = selected[:, lead:].reshape(1, g, g, -1)
    torch.testing.assert_close(pooled[:, lead], grid[:, :2, :2].mean((1, 2)))  # top-left block
    torch.testing.assert_close(pooled[:, lead + 1], grid[:, :2, 2:4].mean((1, 2)))  # its right neighbour
    if lead:
        assert torch.equal(pooled[:, 0], selected[:, 0])
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ds = ConversationDataset(data, tok, model.tower, template="v1")
    batch = collate([ds[0], ds[1]], tok.pad_token_id)
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [model.tower.num_tokens] * 2
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="tower.pool"):
        save_model(model, tok, tmp_path / "stock", kind="stock")
    assert not (tmp_path / "stock").exists()
    assert save_model(model, tok, tmp_path / "m") == "clocmllm"
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.tower.config.pool == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, rtol=0, atol=0)


def test_pool_must_divide_the_grid(world):
    _, tower, _, tok = world
    for bad in (0, 3):
        with pytest.raises(ValueError, match="tower.pool"):
            build_model(
                MllmConfig(tower={"path": str(tower), "pool": bad}, llm={"config": tiny.llm_config()}), tok
            )
