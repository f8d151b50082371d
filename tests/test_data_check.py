"""`clocmllm data check`: every bad input is reported with file, line and field; strict raises."""

import json

import numpy as np
import pytest
from PIL import Image

from clocmllm.cli import main
from clocmllm.data.check import check_dataset
from clocmllm.data.problems import DataError, ProblemLog
from clocmllm.data.regions import read_region_jsonl


def _png(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


@pytest.fixture()
def bad_folder(tmp_path):
    _png(tmp_path / "images" / "ok.png", 40, 30)
    _png(tmp_path / "images" / "small.png", 20, 20)  # declared 40x30 below: wrong
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    good = {
        "image": "images/ok.png",
        "width": 40,
        "height": 30,
        "caption": "c",
        "regions": [{"box": [1, 1, 10, 10], "text": "a"}],
    }
    lines = [
        json.dumps(good),  # 1: fine
        json.dumps({**good, "regions": [{"box": [1, 1, 50, 10], "text": "a"}]}),  # 2: outside declared size
        json.dumps({**good, "regions": [{"box": [9, 1, 3, 10], "text": "a"}]}),  # 3: x2<=x1
        '{"image": "images/ok.png", "caption": "c", "regions": [{"box": [1, NaN, 5, 5], "text": "a"}]}',  # 4: NaN
        json.dumps({**good, "regions": [{"box": [1, 1, 5, 5], "text": "  "}]}),  # 5: empty text
        json.dumps({**good, "image": "images/missing.png"}),  # 6: missing image
        json.dumps({**good, "image": "images/corrupt.png"}),  # 7: corrupt image
        '{"image": "images/ok.png", "caption": ',  # 8: bad JSON
        json.dumps(
            {"image": "images/ok.png", "caption": "c", "regions": [{"box": [1, 1, 45, 10], "text": "a"}]}
        ),  # 9: outside real size
        json.dumps({**good, "image": "images/small.png"}),  # 10: declared size != real size
        json.dumps(
            {**good, "regions": [{"box": [1, 1, 90, 10], "text": ""}, {"box": [1, 1, 2, 2], "text": "b"}]}
        ),  # 11: 2 problems
    ]
    (tmp_path / "regions.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


EXPECTED = {
    (2, "regions[0].box", "outside"),
    (3, "regions[0].box", "x2<=x1"),
    (4, "regions[0].box", "NaN"),
    (5, "regions[0].text", "empty"),
    (6, "image", "missing image"),
    (7, "image", "corrupt image"),
    (8, None, "bad JSON"),
    (9, "regions[0].box", "real image size 40x30"),
    (10, "width", "declared 40x30 but the image is 20x20"),
    (11, "regions[0].box", "outside"),
    (11, "regions[0].text", "empty"),
}


def test_every_problem_is_reported_with_line_and_field(bad_folder):
    report = check_dataset(bad_folder / "regions.jsonl")
    assert not report.ok
    got = {(p.line, p.field) for p in report.problems}
    assert got == {(line, field) for line, field, _ in EXPECTED}
    for line, field, words in EXPECTED:
        (p,) = [p for p in report.problems if (p.line, p.field) == (line, field)]
        assert words in p.reason and p.file.endswith("regions.jsonl")
        assert str(p).startswith(f"{p.file}:{line}: ")
    counts = report.counts_by_field()
    assert counts["regions[].box"] == 5 and counts["image"] == 2
    assert "11 problem(s) in 10 item(s)" in report.summary()


def test_folder_is_searched_and_no_images_skips_decoding(bad_folder):
    report = check_dataset(bad_folder, decode_images=False)
    got = {(p.line, p.field) for p in report.problems}
    # Without decoding: the missing file is still found; corrupt data and real sizes are not.
    assert (6, "image") in got
    assert (7, "image") not in got and (9, "regions[0].box") not in got and (10, "width") not in got
    assert (2, "regions[0].box") in got


def test_strict_raises_at_the_first_problem(bad_folder):
    with pytest.raises(DataError) as err:
        check_dataset(bad_folder / "regions.jsonl", strict=True)
    assert err.value.problem.line == 2
    assert "regions.jsonl:2: regions[0].box:" in str(err.value)
    with pytest.raises(DataError, match=r"regions\.jsonl:2: regions\[0\]\.box"):
        read_region_jsonl(bad_folder / "regions.jsonl", ProblemLog(strict=True))


def test_reader_skips_and_counts(bad_folder):
    log = ProblemLog()
    recs = read_region_jsonl(bad_folder / "regions.jsonl", log)
    # The reader does not decode images: lines 1, 6, 7, 9 (no declared size) and 10 parse.
    assert [r.image for r in recs] == [
        "images/ok.png",
        "images/missing.png",
        "images/corrupt.png",
        "images/ok.png",
        "images/small.png",
    ]
    assert log.seen == 11 and log.skipped == 6


def test_cli_exit_codes_and_output(bad_folder, capsys):
    assert main(["data", "check", str(bad_folder)]) == 1
    out = capsys.readouterr().out
    assert "regions.jsonl:7: image: corrupt image" in out
    assert "11 problem(s)" in out
    assert main(["data", "check", "--strict", str(bad_folder)]) == 1
    assert "regions.jsonl:2: regions[0].box" in capsys.readouterr().err
    (bad_folder / "regions.jsonl").write_text(
        json.dumps(
            {"image": "images/ok.png", "caption": "c", "regions": [{"box": [0, 0, 40, 30], "text": "all"}]}
        )
        + "\n"
    )
    assert main(["data", "check", str(bad_folder / "regions.jsonl")]) == 0
    assert main(["data", "check", str(bad_folder / "nothing-here")]) == 1


def test_world_folder_counts_and_missing_files(tmp_path):
    from clocmllm.data.world import generate_world

    generate_world(tmp_path / "w", 4, 2, seed=0, workers=1, progress=False)
    assert check_dataset(tmp_path / "w" / "world.json").ok
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    meta["counts"]["train"]["images"] = 5
    (tmp_path / "w" / "world.json").write_text(json.dumps(meta))
    (tmp_path / "w" / "eval" / "conversations.json").unlink()
    report = check_dataset(tmp_path / "w")
    fields = {(p.file.split("/w/")[-1], p.field) for p in report.problems}
    assert ("world.json", "counts.train") in fields
    assert ("eval/conversations.json", None) in fields
    assert any("missing" in p.reason for p in report.problems)
