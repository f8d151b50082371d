"""GRIT and COCO readers on tiny fixtures, and loading records as a Hugging Face Dataset."""

import json
import os

import pytest

from clocmllm.data.coco import read_coco
from clocmllm.data.grit import read_grit
from clocmllm.data.problems import DataError, ProblemLog
from clocmllm.data.regions import read_region_jsonl, write_region_jsonl

CAPTION = "a wire hanger with a paper cover"  # "a wire hanger" = [0, 13), "a paper cover" = [19, 32)


def _grit_line(**over):
    obj = {
        "key": "000373938",
        "url": "https://example.invalid/x.jpg",
        "caption": CAPTION,
        "width": 1000,
        "height": 500,
        "noun_chunks": [[19, 32, 0.1, 0.2, 0.5, 0.6, 0.32], [0, 13, 0.0, 0.0, 1.0, 0.9, 0.43]],
        "ref_exps": [[0, 32, 0.0, 0.0, 1.0, 0.9, 0.43]],
    }
    obj.update(over)
    return json.dumps(obj)


def test_grit_spans_become_pixel_regions(tmp_path):
    path = tmp_path / "grit.jsonl"
    path.write_text(_grit_line() + "\n")
    (rec,) = read_grit(
        path, image_root=tmp_path / "imgs", image_template="{shard}/{key}.jpg", spans="noun_chunks"
    )
    assert rec.image == "00037/000373938.jpg"
    assert rec.image_path == os.path.join(str(tmp_path / "imgs"), "00037/000373938.jpg")
    assert [r.text for r in rec.regions] == ["a paper cover", "a wire hanger"]
    assert rec.regions[0].box == pytest.approx([100, 100, 500, 300])
    assert rec.regions[0].extra == {"source": "noun_chunks", "score": 0.32}
    assert rec.extra["url"].startswith("https://")
    (rec,) = read_grit(path)
    assert [r.text for r in rec.regions] == [CAPTION]  # ref_exps by default
    (rec,) = read_grit(path, spans="both", min_score=0.4)
    assert [r.text for r in rec.regions] == [CAPTION, "a wire hanger"]  # the 0.32 span is dropped


def test_grit_problems_are_named(tmp_path):
    path = tmp_path / "grit.jsonl"
    lines = [
        _grit_line(),
        _grit_line(ref_exps=[[0, 99, 0.0, 0.0, 1.0, 1.0, 0.5]]),  # span past the caption
        _grit_line(ref_exps=[[0, 5, 0.0, 0.0, 640, 480, 0.5]]),  # pixel coords, not normalised
        _grit_line(ref_exps=[[0, 5, 0.5, 0.0, 0.2, 1.0, 0.5]]),  # x2 <= x1
        _grit_line(width=None),
        "{oops",
    ]
    path.write_text("\n".join(lines) + "\n")
    log = ProblemLog()
    recs = read_grit(path, problems=log)
    assert len(recs) == 1
    assert [(p.line, p.field) for p in log.problems] == [
        (2, "ref_exps[0]"),
        (3, "ref_exps[0]"),
        (4, "ref_exps[0]"),
        (5, "width"),
        (6, None),
    ]
    assert "outside the caption" in log.problems[0].reason and "normalised" in log.problems[1].reason
    with pytest.raises(DataError, match=r"grit\.jsonl:2: ref_exps\[0\]"):
        read_grit(path, problems=ProblemLog(strict=True))


def _coco(tmp_path):
    instances = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50},
        ],
        "categories": [{"id": 3, "name": "dog"}, {"id": 4, "name": "frisbee"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {
                "id": 11,
                "image_id": 1,
                "category_id": 4,
                "bbox": [60, 50, 40.5, 30],
                "iscrowd": 0,
            },  # +0.5 px: clipped
            {
                "id": 12,
                "image_id": 1,
                "category_id": 3,
                "bbox": [0, 0, 100, 80],
                "iscrowd": 1,
            },  # crowd: skipped
            {"id": 13, "image_id": 2, "category_id": 4, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
            {"id": 14, "image_id": 9, "category_id": 4, "bbox": [5, 5, 5, 5], "iscrowd": 0},  # unknown image
            {
                "id": 15,
                "image_id": 2,
                "category_id": 7,
                "bbox": [5, 5, 5, 5],
                "iscrowd": 0,
            },  # unknown category
            {"id": 16, "image_id": 2, "category_id": 3, "bbox": [40, 40, 20, 5], "iscrowd": 0},  # outside
        ],
    }
    captions = {
        "annotations": [
            {"image_id": 1, "caption": "A dog catches a frisbee."},
            {"image_id": 1, "caption": "dog"},
        ]
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return tmp_path / "instances.json", tmp_path / "captions.json"


def test_coco_boxes_become_corners_with_category_text(tmp_path):
    inst, caps = _coco(tmp_path)
    log = ProblemLog()
    a, b = read_coco(inst, caps, image_root=tmp_path / "val2017", problems=log)
    assert a.image_path == os.path.join(str(tmp_path / "val2017"), "a.jpg")
    assert (a.width, a.height, a.caption) == (100, 80, "A dog catches a frisbee.")
    assert a.extra["captions"] == ["A dog catches a frisbee.", "dog"]
    assert [(r.text, r.box) for r in a.regions] == [("dog", [10, 20, 40, 60]), ("frisbee", [60, 50, 100, 80])]
    assert a.regions[0].extra == {"category_id": 3, "annotation_id": 10}
    assert b.regions == [] and b.caption == ""
    assert [p.field for p in log.problems] == [
        "annotations[3].bbox",
        "annotations[4].image_id",
        "annotations[5].category_id",
        "annotations[6].bbox",
    ]
    assert "x2<=x1" in log.problems[0].reason and "outside" in log.problems[3].reason
    (a2, _) = read_coco(inst, keep_crowd=True, problems=ProblemLog())
    assert len(a2.regions) == 3 and a2.regions[2].extra["iscrowd"] == 1
    with pytest.raises(DataError, match=r"instances\.json: annotations\[3\]\.bbox"):
        read_coco(inst, problems=ProblemLog(strict=True))
    # Converted records round-trip through the region JSONL format.
    write_region_jsonl([a], tmp_path / "out.jsonl")
    (back,) = read_region_jsonl(tmp_path / "out.jsonl", ProblemLog(strict=True))
    assert back.to_json() == a.to_json()


def test_hf_dataset(tmp_path):
    pytest.importorskip("datasets")
    from PIL import Image

    from clocmllm.data.hf_dataset import load_region_dataset, to_hf_dataset
    from clocmllm.data.world import generate_world

    generate_world(tmp_path / "w", 6, 0, seed=5, workers=1, progress=False)
    ds = load_region_dataset(tmp_path / "w" / "train")
    recs = read_region_jsonl(tmp_path / "w" / "train" / "regions.jsonl")
    assert len(ds) == 6
    row = ds[2]
    assert row["texts"] == [r.text for r in recs[2].regions]
    assert row["boxes"] == [pytest.approx(r.box) for r in recs[2].regions]
    assert json.loads(row["region_extra"][0])["shape"] == recs[2].regions[0].extra["shape"]
    assert row["image"] == recs[2].image_path
    decoded = to_hf_dataset(recs[:2], decode_images=True)
    img = decoded[1]["image"]
    assert isinstance(img, Image.Image) and img.size == (64, 64)


def test_cli_convert_coco_then_check(tmp_path, capsys):
    from PIL import Image

    from clocmllm.cli import main

    inst, caps = _coco(tmp_path)
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (100, 80)).save(tmp_path / "val2017" / "a.jpg")
    Image.new("RGB", (50, 50)).save(tmp_path / "val2017" / "b.jpg")
    out = tmp_path / "converted" / "coco.jsonl"
    args = [
        "data",
        "convert",
        "coco",
        str(inst),
        "--captions",
        str(caps),
        "--image-root",
        str(tmp_path / "val2017"),
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert "4 skipped" in capsys.readouterr().out
    (a, b) = read_region_jsonl(out, ProblemLog(strict=True))
    assert a.image == "../val2017/a.jpg" and os.path.isfile(a.image_path)
    assert main(["data", "check", str(out)]) == 0  # paths resolve, boxes fit the real images
    assert main([*args, "--out", str(tmp_path / "strict.jsonl"), "--strict"]) == 1
    assert "annotations[3].bbox" in capsys.readouterr().err
