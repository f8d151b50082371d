"""Proposal grounding (clocmllm/mllm/proposer.py): a box proposer on the frozen tower, candidate
tokens `<rk>` carrying region features, answers that name a candidate, rendered as boxes."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("transformers")

from clocmllm.boxes import format_box, parse_boxes, unit_to_grid
from clocmllm.cli import main as cli_main
from clocmllm.mllm import tiny
from clocmllm.mllm.config import DEFAULTS, merge
from clocmllm.mllm.dataset import ConversationDataset, collate
from clocmllm.mllm.evaluate import evaluate
from clocmllm.mllm.inference import ChatSession
from clocmllm.mllm.proposer import (
    BoxProposer,
    ProposerConfig,
    assign_targets,
    box_iou,
    candidate_tokens,
    last_patches,
    name_candidates,
    proposal_loss,
)
from clocmllm.mllm.save import load_model, save_model
from clocmllm.mllm.templates import insert_candidates
from clocmllm.mllm.train import finetune

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _regions_jsonl(conversations, out):
    """The tiny conversations' images as a region JSONL (one object each)."""
    recs = json.loads(conversations.read_text())
    lines = [
        {"image": r["image"], "width": r["width"], "height": r["height"], "caption": "x",
         "regions": [{"box": r["boxes"][-1], "text": "object"}]}
        for r in recs
    ]  # fmt: skip
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("proposals")
    tower = tiny.make_tower_folder(root / "tower", prompter=True)
    data = tiny.make_conversations(root / "data", n=8, size=(64, 48))
    regions = _regions_jsonl(data, root / "data" / "regions.jsonl")
    assert cli_main(
        ["proposer", "--tower", str(tower), "--data", str(regions), "--eval-data", str(regions),
         "--out", str(root / "proposer"), "--steps", "300", "--batch-size", "8", "--k", "4", "--quiet"]
    ) == 0  # fmt: skip
    return root, tower, data, regions


def test_proposer_folder_metrics_and_learning(setup):
    root, *_ = setup
    folder = root / "proposer"
    assert {p.name for p in folder.iterdir()} == {
        "proposer.safetensors", "proposer_config.json", "metrics.jsonl", "proposer_report.json"
    }  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    report = json.loads((folder / "proposer_report.json").read_text())
    assert report["train"]["objects"] == 8 and 0.0 <= report["train"]["recall50"] <= 1.0
    assert BoxProposer.from_folder(folder).config.k == 4


def test_proposer_bad_input_writes_nothing(setup, tmp_path):
    root, tower, _, _ = setup
    bad = tmp_path / "regions.jsonl"
    bad.write_text('{"image": "missing.png", "caption": "x", "regions": []}\n')
    with pytest.raises(ValueError, match="no usable images"):
        cli_main(
            ["proposer", "--tower", str(tower), "--data", str(bad), "--out", str(tmp_path / "p"), "--quiet"]
        )
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob("p.tmp*"))
    with pytest.raises(FileNotFoundError, match="proposer_config.json"):
        BoxProposer.from_folder(tmp_path)


def test_assign_targets_and_loss():
    boxes = [torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.5, 0.9, 0.95]]), torch.zeros(0, 4)]
    obj, tbox = assign_targets(boxes, grid=4)
    assert obj.sum() == 2 and obj[1].sum() == 0
    assert obj[0, 0] == 1 and obj[0, 2 * 4 + 3] == 1  # centres (0.2, 0.2) and (0.75, 0.725)
    torch.testing.assert_close(tbox[0, 11], boxes[0][1])
    logits = torch.zeros(2, 16, requires_grad=True)
    perfect, parts = proposal_loss(logits, tbox, obj, tbox)
    worse, _ = proposal_loss(logits, tbox.flip(-1), obj, tbox)
    assert (
        parts["l1"] == 0.0 and abs(parts["giou"]) < 1e-6 and float(worse.detach()) > float(perfect.detach())
    )


def test_propose_gives_k_boxes_in_reading_order():
    torch.manual_seed(0)
    prop = BoxProposer(ProposerConfig(grid=4, dim=8, width=16, k=5, nms_iou=1e-6))
    boxes, scores = prop.propose(torch.randn(3, 16, 8))
    assert boxes.shape == (3, 5, 4) and scores.shape == (3, 5)  # K even when NMS keeps fewer
    assert bool(((boxes >= 0) & (boxes <= 1)).all())
    for b in boxes:
        cy = (b[:, 1] + b[:, 3]) / 2
        rows = (cy * 4).floor().clamp(0, 3)
        assert bool((rows[1:] >= rows[:-1]).all())
    with pytest.raises(ValueError, match="another tower"):
        prop(torch.randn(1, 9, 8))


def test_name_candidates_injects_only_missed_answers():
    boxes = torch.tensor([[0.5, 0.5, 0.7, 0.7], [0.0, 0.0, 0.2, 0.2], [0.5, 0.0, 0.7, 0.2]])
    scores = torch.tensor([0.9, 0.8, 0.1])
    covered = [0.0, 0.0, 0.21, 0.2]
    missed = [0.1, 0.6, 0.3, 0.9]
    cands, conf, names, injected = name_candidates([covered, missed], boxes, scores, grid=4, inject=True)
    assert injected == 1
    # the least confident proposal (0.5, 0, 0.7, 0.2) gave way; reading order: row 0, row 2, row 3
    torch.testing.assert_close(cands, torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], missed]))
    assert names == [0, 2]
    torch.testing.assert_close(conf, torch.tensor([0.8, 0.9, 0.5]))  # an injected box: neutral 0.5
    cands, conf, names, injected = name_candidates([missed], boxes, scores, grid=4, inject=False)
    assert injected == 0 and float(box_iou(cands[names[0]], torch.tensor(missed))[0]) < 0.5


def _recipe(root, tower, data, proposer, **train) -> dict:
    return merge(
        DEFAULTS,
        {
            "model": {
                "tower": {"path": str(tower)},
                "regions": "shared",
                "proposer": str(proposer),
                "llm": {"config": tiny.llm_config("qwen2")},
            },
            "data": {"train": str(data), "max_length": 160},
            "train": {"batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "plot": False, **train},
        },
    )


@pytest.fixture(scope="module")
def trained(setup):
    root, tower, data, _ = setup
    out = finetune(_recipe(root, tower, data, root / "proposer", stage=2, max_steps=150,
                           output_dir=str(root / "mllm")))  # fmt: skip
    return load_model(out)


def test_data_lists_candidates_and_answers_name_one(setup, trained):
    root, tower, data, _ = setup
    model, tok = trained
    names = candidate_tokens(4)
    assert model.config.candidate_token_ids == tok.convert_tokens_to_ids(names)
    ds = ConversationDataset(data, tok, model.tower, template="v1", max_length=160, proposer=model.proposer)
    assert ds.stats["kept"] == 8 and "candidates_injected" in ds.stats
    cand_ids = set(model.config.candidate_token_ids)
    for s in ds.samples:
        ids = s.input_ids
        first = [i for i, t in enumerate(ids) if t in cand_ids][:4]
        image_end = max(i for i, t in enumerate(ids) if t == model.config.image_token_id)
        assert [ids[i] for i in first] == model.config.candidate_token_ids and first[0] > image_end
        assert len(s.candidate_boxes) == 4
        answer = [t for t, lab in zip(ids, s.labels, strict=True) if lab != -100 and t in cand_ids]
        grounding = s.record["id"] in {"s1", "s3", "s5", "s7"}
        assert len(answer) == (1 if grounding else 0)  # grounding answers name one candidate
    assert insert_candidates("<image>\nWhere?", 2) == "<image>\n<r0> <r1>\nWhere?"
    assert insert_candidates("Where?\n<image>", 2, "after_prompt") == "Where?\n<image>\n<r0> <r1>"

    # the first <rk> carries candidate k's region feature; the answer's <rk> does not
    batch = collate([ds[1], ds[3]], tok.pad_token_id)
    with torch.no_grad():
        e1 = model.embed(batch["input_ids"], batch["pixel_values"], batch["region_boxes"],
                         batch["region_mask"], batch["candidate_boxes"])  # fmt: skip
        moved = batch["candidate_boxes"].clone()
        moved[:, 2] = torch.tensor([0.0, 0.0, 0.5, 0.5])
        e2 = model.embed(batch["input_ids"], batch["pixel_values"], batch["region_boxes"],
                         batch["region_mask"], moved)  # fmt: skip
    changed = (e1 - e2).abs().amax(-1) > 1e-6
    r2 = batch["input_ids"] == model.config.candidate_token_ids[2]
    first_r2 = r2 & (r2.long().cumsum(1) == 1)
    assert torch.equal(changed, first_r2)
    assert torch.isfinite(model(**batch).loss)


def test_trained_model_names_the_covering_candidate(setup, trained):
    """After memorising 8 samples, grounding Acc@0.5 equals the share of targets some proposal
    covers (the model names the best candidate, rendered as its box)."""
    root, tower, data, _ = setup
    model, tok = trained
    result = evaluate(model, tok, data, max_new_tokens=8, progress=False)
    covered = 0
    recs = [r for r in json.loads(data.read_text()) if r["task"] == "grounding"]
    from PIL import Image

    for r in recs:
        with Image.open(data.parent / r["image"]) as im:
            session = ChatSession(model, tok, im.convert("RGB"))
        truth = torch.tensor(session.geometry.to_unit(r["boxes"][-1]))
        covered += int(float(box_iou(truth[None], torch.tensor(session.candidates))[0].max()) >= 0.5)
    assert result["grounding_unparsable"] == 0
    assert result["grounding_acc50"] == pytest.approx(covered / len(recs)) and covered >= 1


def test_chat_renders_names_as_boxes_and_saves(setup, trained, tmp_path):
    root, tower, data, _ = setup
    model, tok = trained
    from PIL import Image

    with Image.open(data.parent / "images/0001.png") as im:
        session = ChatSession(model, tok, im.convert("RGB"), max_new_tokens=8)
    r3 = model.config.candidate_token_ids[3]
    text = session.render([r3, tok.eos_token_id])
    assert text == format_box(unit_to_grid(session.candidates[3])) and parse_boxes(text)
    assert session.render([r3], names=True) == "<r3>"
    rec = json.loads(data.read_text())[1]  # a grounding sample the model has memorised
    chunks: list[str] = []
    ans = session.ask(rec["conversations"][0]["value"].replace("<image>\n", ""), stream=chunks.append)
    assert "".join(chunks).strip() == ans.text  # streamed with the name shown as its box
    assert session.turns[0][1].startswith("<image>\n<r0> <r1> <r2> <r3>\n")  # after_image default
    # the answer shows a candidate's box; the history keeps the name the model wrote
    named = [k for k in range(4) if f"<r{k}>" in session.turns[1][1]]
    assert len(named) == 1 and ans.grid_boxes == [unit_to_grid(session.candidates[named[0]])]
    # saved and reloaded: the same proposals; never a stock LLaVA folder
    with pytest.raises(ValueError, match="proposer"):
        save_model(model, tok, tmp_path / "stock", kind="stock")
    save_model(model, tok, tmp_path / "m")
    again, tok2 = load_model(tmp_path / "m")
    pix = session.pixel_values[None]
    a = model.proposer.propose(last_patches(model.tower, pix))[0]
    b = again.proposer.propose(last_patches(again.tower, pix))[0]
    torch.testing.assert_close(a, b)
    assert tok2.convert_tokens_to_ids("<r3>") == r3


def test_dual_grounding_turns_referring_around(setup):
    from clocmllm.mllm.dataset import dual_grounding_record

    rec = {
        "id": "r1", "image": "images/0000.png", "width": 64, "height": 48, "task": "referring",
        "boxes": [[1, 2, 30, 40], [5, 6, 20, 22]],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is at [15, 41, 468, 833] <region>?"},
            {"from": "gpt", "value": "It is a large blue diamond."},
            {"from": "human", "value": "And [78, 125, 312, 458] <region>?"},
            {"from": "gpt", "value": "The small red circle"},
        ],
    }  # fmt: skip
    dual = dual_grounding_record(rec, "Locate the {phrase}.")
    assert dual["task"] == "grounding" and dual["boxes"] == rec["boxes"] and dual["id"] == "r1-dual"
    assert [m["value"] for m in dual["conversations"][0::2]] == [
        "<image>\nLocate the large blue diamond.", "Locate the small red circle."
    ]  # fmt: skip
    assert dual_grounding_record({**rec, "task": "grounding"}, "{phrase}") is None
    assert dual_grounding_record({**rec, "boxes": None}, "{phrase}") is None

    _, _, data, _ = setup
    from clocmllm.mllm.tokenizer import build_tokenizer
    from clocmllm.mllm.tower import TowerConfig, VisionTower

    root = setup[0]
    tok = build_tokenizer(tiny.conversation_texts(data) + ["locate"])
    tower = VisionTower(TowerConfig(str(root / "tower")))
    ds = ConversationDataset(
        data, tok, tower, template="v1", max_length=160, dual_grounding="Locate the {phrase}."
    )
    assert ds.stats["dual_grounding"] == 4 and ds.stats["kept"] == 12  # 4 referring samples turned around


def test_proposer_given_only_with_init_from_is_refused(setup, tmp_path):
    root, tower, data, _ = setup
    plain = _recipe(
        root, tower, data, root / "proposer", stage=1, max_steps=1, output_dir=str(tmp_path / "s1")
    )
    plain["model"]["proposer"] = None
    s1 = finetune(plain)
    later = _recipe(
        root, tower, data, root / "proposer", stage=2, max_steps=1, output_dir=str(tmp_path / "s2")
    )
    later["model"]["init_from"] = str(s1)
    with pytest.raises(ValueError, match="has no proposer"):
        finetune(later)


def test_pointer_logits_touch_only_names_from_their_position_on():
    from clocmllm.mllm.pointer import add_pointer_logits, first_positions

    ids = torch.tensor([[5, 7, 3, 8, 7, 1]])  # names 7 and 8 first appear at 1 and 3; 7 again at 4
    first, pos = first_positions(ids, [7, 8, 9])
    assert pos.tolist() == [[1, 3, 6]] and first[0, 4].sum() == 0  # 9 absent: position T
    logits = torch.randn(1, 6, 10)
    scores = torch.ones(1, 6, 3)
    out = add_pointer_logits(logits, scores, [7, 8, 9], torch.arange(6), pos)
    diff = out - logits
    assert diff[..., [0, 1, 2, 3, 4, 5, 6]].abs().max() == 0  # other tokens untouched
    torch.testing.assert_close(diff[0, :, 7], torch.tensor([0.0, 1, 1, 1, 1, 1]))
    torch.testing.assert_close(diff[0, :, 8], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    assert diff[0, :, 9].abs().max() == 0  # a name not in the prompt is never pointed at
