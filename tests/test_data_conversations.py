"""LLaVA conversation JSON: round trip, and each validation rule reported with line and field."""

import json

import pytest

from clocmllm.boxes import format_box, to_grid
from clocmllm.data.check import check_dataset
from clocmllm.data.conversations import Conversation, Turn, read_conversations, write_conversations
from clocmllm.data.problems import DataError, ProblemLog

W, H = 200, 100
BOX = [20.0, 10.0, 120.0, 90.0]
GRID = format_box(to_grid(BOX, W, H, size=max(W, H)))


def _item(**over):
    base = {
        "id": "x",
        "image": "img.png",
        "task": "referring",
        "width": W,
        "height": H,
        "boxes": [BOX],
        "conversations": [
            {"from": "human", "value": f"<image>\nWhat is at {GRID} <region>?"},
            {"from": "gpt", "value": "a cat"},
        ],
    }
    base.update(over)
    return base


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_grid_text_uses_the_letterbox_square():
    # 200x100 image: the model sees a 200x200 square, so y=90 maps to 449, not 899.
    assert GRID == "[100, 50, 600, 450]"


def test_round_trip_keeps_everything(tmp_path):
    convs = [
        Conversation(
            "a", [Turn("human", "<image>\nHi"), Turn("gpt", "Hello")], image="img.png", extra={"source": "s"}
        ),
        Conversation("b", [Turn("human", "Plain text only"), Turn("gpt", "ok")]),
        Conversation(
            "c",
            [Turn("human", "<image>\nWhere is the cat?"), Turn("gpt", GRID)],
            image="img.png",
            task="grounding",
            width=W,
            height=H,
            boxes=[BOX],
        ),
    ]
    path = tmp_path / "conv.json"
    write_conversations(convs, path)
    assert isinstance(json.loads(path.read_text()), list)  # plain LLaVA JSON list
    back = read_conversations(path, ProblemLog(strict=True))
    assert [c.to_json() for c in back] == [c.to_json() for c in convs]
    assert back[2].grid_boxes() == [to_grid(BOX, W, H, size=W)]
    assert back[0].image_path == str(tmp_path / "img.png")
    assert not list(tmp_path.glob("*.tmp"))  # the atomic writer left no temp file


BAD = [
    (
        _item(conversations=_turns(f"What is at {GRID} <region>?", "a cat")),
        "conversations[0].value",
        "<image>",
    ),
    (
        _item(conversations=_turns(f"<image>\nWhat is at {GRID} <region>?", "  ")),
        "conversations[1].value",
        "empty",
    ),
    (
        _item(conversations=[{"from": "gpt", "value": "hi"}, {"from": "human", "value": "<image>\nyo"}]),
        "conversations[0].from",
        "alternate",
    ),
    (
        _item(conversations=_turns("<image>\nWhat is at [1, 2, 3, 4] <region>?", "a cat")),
        "conversations[0].value",
        "does not match",
    ),
    (_item(conversations=_turns(f"<image>\nWhat is at {GRID}?", "a cat")), "conversations", "<region>"),
    (_item(boxes=[BOX, BOX]), "boxes", "2 boxes listed but 1 box texts"),
    (_item(boxes=[[0, 0, 300, 50]]), "boxes[0]", "outside"),
    (_item(task="caption"), "task", "one of"),
    (_item(width=0), "width", "positive"),
    (_item(id=""), "id", "empty id"),
    (_item(conversations=[]), "conversations", "non-empty"),
]


@pytest.mark.parametrize("item,field,words", BAD)
def test_each_rule_is_reported(tmp_path, item, field, words):
    good = _item()
    path = tmp_path / "conv.json"
    path.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(item) + "\n]\n")
    log = ProblemLog()
    got = read_conversations(path, log)
    assert [c.id for c in got] == ["x"]  # the good item is kept, the bad one skipped
    assert any(p.line == 3 and p.field == field and words in p.reason for p in log.problems), log.problems
    assert all(p.line == 3 for p in log.problems)
    with pytest.raises(DataError, match=r"conv\.json:3: "):
        read_conversations(path, ProblemLog(strict=True))


def test_bad_json_is_reported_with_its_line(tmp_path):
    path = tmp_path / "conv.json"
    path.write_text("[\n" + json.dumps(_item()) + ",\n" + '{"id": "y", "conversations": [}' + "\n]\n")
    log = ProblemLog()
    assert len(read_conversations(path, log)) == 1
    assert len(log.problems) == 1 and log.problems[0].line == 3 and "bad JSON" in log.problems[0].reason
    path.write_text('{"not": "a list"}')
    log = ProblemLog()
    assert read_conversations(path, log) == [] and "JSON list" in log.problems[0].reason


def test_jsonl_variant_and_check_decodes_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (W, H)).save(tmp_path / "img.png")
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(_item()) + "\n" + json.dumps(_item(id="y", image="gone.png")) + "\n")
    assert len(read_conversations(path, ProblemLog())) == 2  # the reader does not open images
    report = check_dataset(path)
    assert [(p.line, p.field) for p in report.problems] == [(2, "image")]
    assert "missing image" in report.problems[0].reason
