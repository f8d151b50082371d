"""MLLM building blocks: geometry, RoI-Align, connector, tokenizer, templates, dataset, model, parser."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("transformers")

from clocmllm.boxes import Letterbox, format_box, parse_boxes, to_grid
from clocmllm.mllm import templates, tiny
from clocmllm.mllm.connector import build_connector
from clocmllm.mllm.dataset import IGNORE_INDEX, ConversationDataset, collate
from clocmllm.mllm.evaluate import normalise
from clocmllm.mllm.geometry import Geometry
from clocmllm.mllm.model import MllmConfig, build_model
from clocmllm.mllm.roi_align import roi_align
from clocmllm.mllm.tokenizer import IMAGE_TOKEN, REGION_TOKEN, build_tokenizer, tokens_per_box
from clocmllm.mllm.tower import TowerConfig, VisionTower

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm_core")
    tower = tiny.make_tower_folder(root / "tower")
    data = tiny.make_conversations(root / "data", n=6, size=(96, 64))
    tok = build_tokenizer(tiny.conversation_texts(data))
    return root, tower, data, tok


# ---- geometry ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["letterbox", "pad"])
def test_geometry_round_trip_and_pixels(mode):
    geom = Geometry(96, 64, 32, mode)
    box = [10.0, 20.0, 50.0, 60.0]
    back = geom.from_grid(geom.to_grid(box))
    assert max(abs(a - b) for a, b in zip(back, box, strict=True)) <= 96 / 1000 + 1e-6
    # a white box painted on black lands where to_unit says, in the square the tower sees
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([24, 16, 71, 47], fill=(255, 255, 255))
    sq = torch.tensor(list(geom.apply(img, (0, 0, 0)).convert("L").getdata())).reshape(32, 32)
    ys, xs = torch.nonzero(sq > 128, as_tuple=True)
    ux1, uy1, ux2, uy2 = geom.to_unit([24, 16, 72, 48])
    assert abs(xs.min().item() / 32 - ux1) <= 1.5 / 32 and abs((xs.max().item() + 1) / 32 - ux2) <= 1.5 / 32
    assert abs(ys.min().item() / 32 - uy1) <= 1.5 / 32 and abs((ys.max().item() + 1) / 32 - uy2) <= 1.5 / 32


def test_geometry_letterbox_is_boxes_letterbox():
    geom = Geometry(300, 200, 224, "letterbox")
    box = [30.0, 40.0, 120.0, 180.0]
    assert geom.to_unit(box) == Letterbox(300, 200, 224).to_unit(box)
    assert geom.to_grid(box) == to_grid(box, 300, 200, size=224)


def test_geometry_pad_is_centred():
    # 100x50 -> square of 100 with 25 px above and below: the image's top edge is at y=0.25
    geom = Geometry(100, 50, 32, "pad")
    assert geom.to_unit([0, 0, 100, 50]) == [0.0, 0.25, 1.0, 0.75]


# ---- RoI-Align --------------------------------------------------------------------------
def test_roi_align_matches_bilinear_reference():
    torch.manual_seed(0)
    grid = torch.randn(2, 3, 4, 4)
    boxes = torch.tensor(
        [[[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]], [[0.3, 0.3, 0.5, 0.7], [0.5, 0.0, 1.0, 0.5]]]
    )

    def bilinear(img, x, y):  # img [C,H,W], continuous coords with cell centres at i + 0.5
        h, w = img.shape[1:]
        x, y = min(max(x - 0.5, 0), w - 1), min(max(y - 0.5, 0), h - 1)
        x0, y0 = int(x), int(y)
        x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
        fx, fy = x - x0, y - y0
        return (
            img[:, y0, x0] * (1 - fx) * (1 - fy)
            + img[:, y0, x1] * fx * (1 - fy)
            + img[:, y1, x0] * (1 - fx) * fy
            + img[:, y1, x1] * fx * fy
        )

    out = roi_align(grid, boxes, output_size=2, sampling_ratio=2)
    assert out.shape == (2, 2, 3)
    for b in range(2):
        for m in range(2):
            x1, y1, x2, y2 = boxes[b, m].tolist()
            pts = [
                bilinear(grid[b], (x1 + (x2 - x1) * (i + 0.5) / 4) * 4, (y1 + (y2 - y1) * (j + 0.5) / 4) * 4)
                for i in range(4)
                for j in range(4)
            ]
            torch.testing.assert_close(out[b, m], torch.stack(pts).mean(0), atol=1e-5, rtol=1e-5)


# ---- connector --------------------------------------------------------------------------
def test_connector_kinds():
    assert isinstance(build_connector("linear", 8, 16), torch.nn.Linear)
    mlp = build_connector("mlp3x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert set(dict(build_connector("mlp2x_gelu", 8, 16).named_parameters())) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    }
    with pytest.raises(ValueError, match="unknown connector"):
        build_connector("mlp2x_relu", 8, 16)


# ---- tokenizer and templates ----------------------------------------------------------------
def test_tokenizer_numbers_are_single_tokens(world):
    _, _, _, tok = world
    assert tokens_per_box(tok) == 9
    for n in (0, 7, 123, 999):
        assert len(tok(str(n), add_special_tokens=False)["input_ids"]) == 1
    ids = tok(f"{IMAGE_TOKEN} at [1, 2, 3, 4] {REGION_TOKEN}", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(IMAGE_TOKEN) and ids[-1] == tok.convert_tokens_to_ids(
        REGION_TOKEN
    )
    assert parse_boxes(tok.decode(ids)) == [[1, 2, 3, 4]]


@pytest.mark.parametrize("template", ["plain", "v1", "chat"])
def test_templates_mask_all_but_answers(world, template):
    _, _, _, tok = world
    if template == "chat":
        tok = build_tokenizer(["hello"])
        tok.chat_template = (
            "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
            "{% if add_generation_prompt %}<s> assistant :{% endif %}"
        )
    turns = [
        ("user", "what is it ?"),
        ("assistant", "a red circle"),
        ("user", "where ?"),
        ("assistant", "[1, 2, 3, 4]"),
    ]
    segs = templates.segments(template, turns, tok)
    targets = "".join(t for t, is_target in segs if is_target)
    assert "a red circle" in targets and "[1, 2, 3, 4]" in targets and "what is it" not in targets
    assert "what is it" in "".join(t for t, _ in segs)


# ---- dataset ---------------------------------------------------------------------------------
def _tower(path, **kw):
    return VisionTower(TowerConfig(path=str(path), **kw))


@pytest.mark.parametrize("preprocess", ["letterbox", "pad"])
def test_dataset_boxes_labels_regions(world, preprocess):
    _, tower_dir, data, tok = world
    tower = _tower(tower_dir, preprocess=preprocess)
    ds = ConversationDataset(data, tok, tower, template="v1", max_length=512)
    records = json.loads(data.read_text())
    for i, rec in enumerate(records):
        item = ds[i]
        geom = tower.geometry(rec["width"], rec["height"])
        want = format_box(geom.to_grid(rec["boxes"][0]))
        text = tok.decode(item["input_ids"])
        assert parse_boxes(text) == parse_boxes(want)  # the text box is on THIS tower's grid
        n_image = int((item["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum())
        assert n_image == tower.num_tokens == 16
        answer = tok.decode(item["input_ids"][item["labels"] != IGNORE_INDEX], skip_special_tokens=True)
        gpt = rec["conversations"][1]["value"]
        if rec["task"] == "grounding":
            assert parse_boxes(answer) == parse_boxes(want)
            assert item["region_boxes"].shape == (0, 4)
        else:
            assert normalise(answer) == normalise(gpt)
            torch.testing.assert_close(item["region_boxes"][0], torch.tensor(geom.to_unit(rec["boxes"][0])))
        assert item["pixel_values"].shape == (3, 32, 32)


def test_dataset_truncation_counts(world):
    _, tower_dir, data, tok = world
    tower = _tower(tower_dir)
    full = ConversationDataset(data, tok, tower, template="v1", max_length=512)
    lengths = [len(s.input_ids) for s in full.samples]
    # cut inside the answers: kept but truncated; cut before the image ends: dropped
    cut = ConversationDataset(data, tok, tower, template="v1", max_length=max(lengths) - 1)
    assert cut.stats["truncated"] + cut.stats["dropped_too_long"] >= 1
    assert all(len(s.input_ids) <= max(lengths) - 1 for s in cut.samples)
    with pytest.raises(ValueError, match="no usable samples"):
        ConversationDataset(data, tok, tower, template="v1", max_length=20)


# ---- model -----------------------------------------------------------------------------------
def test_model_regions_change_logits_and_counts_are_checked(world):
    _, tower_dir, data, tok = world
    torch.manual_seed(0)
    cfg = MllmConfig(tower={"path": str(tower_dir)}, regions="shared", llm={"config": tiny.llm_config()})
    model = build_model(cfg, tok).eval()
    ds = ConversationDataset(data, tok, model.tower, template="v1")
    batch = collate([ds[0], ds[2]], tok.pad_token_id)  # two referring samples
    assert batch["region_mask"].sum() == 2
    with torch.no_grad():
        with_regions = model(**batch).logits
        moved = dict(batch, region_boxes=torch.tensor([[[0.0, 0.0, 0.2, 0.2]], [[0.7, 0.7, 1.0, 1.0]]]))
        other = model(**moved).logits
        model.config.regions = "none"
        without = model(**batch).logits
    assert (with_regions - other).abs().max() > 1e-4  # the box feeds the region token
    assert (with_regions - without).abs().max() > 1e-4
    model.config.regions = "shared"
    ids = batch["input_ids"].clone()
    ids[ids == tok.convert_tokens_to_ids(IMAGE_TOKEN)] = tok.pad_token_id  # image tokens lost
    with pytest.raises(ValueError, match="<image> tokens"):
        model(**dict(batch, input_ids=ids))


def test_tower_from_clip_model_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision_config=tiny.TOWER_SIZES["tiny"],
        text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
        ),
        projection_dim=8,
    )
    clip = CLIPModel(cfg)
    clip.save_pretrained(tmp_path)
    tower = _tower(tmp_path, feature="cls_patch", layer=-1)
    assert tower.num_tokens == 17
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        sel, _ = tower(x)
        ref = clip.vision_model(x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(sel, ref)


# ---- answer parser ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,boxes",
    [
        ("[ 12 , 34 , 56 , 78 ]", [[12, 34, 56, 78]]),  # the word-level decoder's spacing
        ("it is at [12,34,56,78] and [1, 2, 3, 4].", [[12, 34, 56, 78], [1, 2, 3, 4]]),
        ("[56, 78, 12, 34]", [[12, 34, 56, 78]]),  # corners swapped
        ("[-5, 10, 1200, 20]", [[0, 10, 999, 20]]),  # clamped to the grid
        ("[10.4, 20.6, 30, 40]", [[10, 21, 30, 40]]),
        ("[5, 5, 5, 9]", []),  # zero area
        ("[1, 2, 3]", []),
        ("a red circle", []),
    ],
)
def test_answer_parser_edge_cases(text, boxes):
    assert parse_boxes(text) == boxes


def test_normalise_for_referring():
    assert normalise("The  Red circle .") == normalise("red circle") == "red circle"
    assert (
        normalise("It is a large blue diamond.")
        == normalise("the large blue diamond")
        == "large blue diamond"
    )
    assert normalise("a red circle") != normalise("a blue circle")


def test_tower_region_features_come_from_the_prompter(tmp_path):
    tower = _tower(tiny.make_tower_folder(tmp_path / "tp", prompter=True))
    assert tower.region_source == "prompter"
    torch.manual_seed(0)
    with torch.no_grad():
        selected, last = tower(torch.randn(2, 3, 32, 32))
        boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.4, 0.9]]] * 2)
        feat = tower.region_features(selected, last, boxes)
        _, want = tower.prompter(last, boxes)
    assert feat.shape == (2, 3, 32)
    torch.testing.assert_close(feat, want)
    assert (feat[0, 0] - feat[0, 1]).abs().max() > 1e-4  # boxes matter
    roi = _tower(tiny.make_tower_folder(tmp_path / "tp", prompter=True), region="roi_align")
    assert roi.region_source == "roi_align"


def test_random_llm_config_must_give_its_size():
    """A bare {model_type: qwen2} would build a 7B-class model at random init (tens of GB)."""
    from clocmllm.mllm.model import build_llm

    with pytest.raises(
        ValueError, match=r"missing \['hidden_size', 'num_hidden_layers', 'intermediate_size'\]"
    ):
        build_llm({"config": {"model_type": "qwen2"}})
    with pytest.raises(ValueError, match="needs `model_type`"):
        build_llm({"config": {"hidden_size": 8}})
    llm = build_llm({"config": tiny.llm_config("qwen2")}, vocab_size=64)
    assert llm.get_input_embeddings().num_embeddings == 64


def test_user_text_places_one_box_and_refuses_mismatched_regions():
    from clocmllm.mllm.inference import user_text

    box = [100, 200, 300, 400]
    placed = "What is the object at [100, 200, 300, 400] <region>?"
    assert user_text("What is the object at {box}?", box, False) == placed
    assert user_text("What is the object at <region>?", box, False) == placed  # typed token = {box}
    assert user_text("What is it?", box, False) == "What is it? [100, 200, 300, 400] <region>"
    assert user_text(None, box, False) == placed  # the default referring question
    for prompt, given in [
        ("Compare {box} and <region>.", box),
        ("What is at {box}?", None),
        ("<region>?", None),
    ]:
        with pytest.raises(ValueError, match="--box"):
            user_text(prompt, given, False)
