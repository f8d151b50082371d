"""The synthetic world: determinism, difficulty rules, unambiguous references, the CLI."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clocmllm.boxes import to_grid
from clocmllm.cli import main
from clocmllm.data import world_vocab as V
from clocmllm.data.conversations import read_conversations
from clocmllm.data.problems import ProblemLog
from clocmllm.data.regions import read_region_jsonl
from clocmllm.data.world import generate_world, make_sample

N_STATS = 300


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def samples():
    return [make_sample(7, "train", i) for i in range(N_STATS)]


def test_world_is_byte_identical_across_runs_and_worker_counts(tmp_path):
    a = generate_world(tmp_path / "a", 60, 10, seed=3, workers=1, progress=False)
    generate_world(tmp_path / "b", 60, 10, seed=3, workers=2, progress=False)  # uses a pool (>= 64 images)
    da, db = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert len(da) == 70 + 5  # images + 2x(regions, conversations) + world.json
    assert da == db
    generate_world(tmp_path / "c", 60, 10, seed=4, workers=1, progress=False)
    dc = _tree_digest(tmp_path / "c")
    assert sum(da[k] != dc[k] for k in da if k.endswith(".png")) >= 65  # another seed, other images
    # train and eval are different streams: no eval image repeats a train image
    train = {v for k, v in da.items() if k.startswith("train/images")}
    evals = {v for k, v in da.items() if k.startswith("eval/images")}
    assert not train & evals
    assert a["counts"]["train"]["images"] == 60 and a["counts"]["eval"]["images"] == 10
    meta = json.loads((tmp_path / "a" / "world.json").read_text())
    assert meta["seed"] == 3 and meta["vocabulary"]["shapes"] == list(V.SHAPES)
    assert len(meta["classes"]) == len(V.SHAPES) * len(V.COLORS) * len(V.SIZES)
    assert "seconds" not in meta  # timings would break byte identity


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        generate_world(tmp_path, 2, 1, seed=0, workers=1, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_object_counts_and_distractors(samples):
    counts = np.array([len(s.record.regions) for s in samples])
    assert 0.75 <= np.mean((counts >= 2) & (counts <= 4)) <= 0.98
    assert counts.min() >= 1 and counts.max() <= 5
    assert np.any(counts == 1) and np.any(counts == 5)
    shared = 0
    multi = 0
    for s in samples:
        regs = s.record.regions
        phrases = [r.text for r in regs]
        assert len(set(phrases)) == len(phrases)  # each region phrase is unique in its image
        if len(regs) < 2:
            continue
        multi += 1
        target = regs[0].extra
        others = [r.extra for r in regs[1:]]
        if any(o["color"] == target["color"] or o["shape"] == target["shape"] for o in others):
            shared += 1
    assert shared / multi >= 0.9  # distractors share colour or shape with the target


def test_regions_fit_vocabulary_and_overlap_is_bounded(samples):
    sizes = {"small": [], "large": []}
    for s in samples:
        rec = s.record
        for r in rec.regions:
            assert r.text == f"{r.extra['size']} {r.extra['color']} {r.extra['shape']}"
            assert r.extra["shape"] in V.SHAPES and r.extra["color"] in V.COLORS
            x1, y1, x2, y2 = r.box
            assert 0 <= x1 < x2 <= rec.width and 0 <= y1 < y2 <= rec.height
            sizes[r.extra["size"]].append(max(x2 - x1, y2 - y1))
        for i, a in enumerate(rec.regions):
            for b in rec.regions[i + 1 :]:
                ix = max(0, min(a.box[2], b.box[2]) - max(a.box[0], b.box[0]))
                iy = max(0, min(a.box[3], b.box[3]) - max(a.box[1], b.box[1]))
                small = min(
                    (a.box[2] - a.box[0]) * (a.box[3] - a.box[1]),
                    (b.box[2] - b.box[0]) * (b.box[3] - b.box[1]),
                )
                assert ix * iy / small <= V.MAX_OVERLAP + 1e-6
    assert max(sizes["small"]) < min(sizes["large"])  # small and large never overlap


def test_objects_are_visible_in_the_pixels(samples):
    """The object's own colour is at its box centre (solid shapes), far from the background."""
    hits, total = 0, 0
    for s in samples[:150]:
        rec, img = s.record, s.pixels.astype(float)
        corner = img[0, 0]
        for r in rec.regions:
            if r.extra["shape"] == "ring":
                continue  # hollow centre
            cx, cy = int((r.box[0] + r.box[2]) / 2), int((r.box[1] + r.box[3]) / 2)
            base = np.array(V.COLORS[r.extra["color"]], float)
            total += 1
            hits += np.linalg.norm(img[cy, cx] - base) < 45 and np.linalg.norm(base - corner) > 60
    assert hits / total >= 0.93


_REF = re.compile(
    rf"^the (?:(small|large) )?(?:({'|'.join(V.COLORS)}) )?({'|'.join(V.SHAPES)}|object)"
    r"(?: (left of|right of|above|below) the (.+))?$"
)


def _fits(regions, size, color, shape):
    return [
        k
        for k, r in enumerate(regions)
        if (size is None or r.extra["size"] == size)
        and (color is None or r.extra["color"] == color)
        and (shape == "object" or r.extra["shape"] == shape)
    ]


def _resolve(ref: str, regions) -> list[int]:
    """An independent reading of a referring expression: which objects does it fit?"""
    m = _REF.match(ref)
    assert m, ref
    size, color, shape, rel, anchor_text = m.groups()
    cands = _fits(regions, size, color, shape)
    if rel is None:
        return cands
    anchors = _resolve("the " + anchor_text, regions)
    assert len(anchors) == 1, f"anchor of {ref!r} is ambiguous"
    a = regions[anchors[0]].box
    acx, acy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2

    def stands(k):
        b = regions[k].box
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        return {"left of": cx < acx, "right of": cx > acx, "above": cy < acy, "below": cy > acy}[rel]

    return [k for k in cands if k != anchors[0] and stands(k)]


def test_referring_expressions_pick_exactly_their_object(samples):
    n_rel = 0
    for s in samples:
        regs = s.record.regions
        for i, r in enumerate(regs):
            assert r.extra["refs"], "the full phrase is always unique, so every region has a reference"
            for ref in r.extra["refs"]:
                assert _resolve(ref, regs) == [i], (ref, s.record.to_json())
                n_rel += " of the " in ref or " above the " in ref or " below the " in ref
    assert n_rel >= 50  # relation expressions do get generated


def test_world_conversations_validate_and_match_regions(samples):
    for s in samples[:100]:
        by_box = {tuple(r.box): r for r in s.record.regions}
        for c in s.conversations:
            assert c["conversations"][0]["value"].startswith("<image>\n")
            for b in c["boxes"]:
                assert tuple(b) in by_box
            if c["task"] == "grounding":
                for turn, box in zip(c["conversations"][1::2], c["boxes"], strict=True):
                    assert turn["value"] == "[" + ", ".join(map(str, to_grid(box, 64, 64, size=64))) + "]"
            else:
                for turn, box in zip(c["conversations"][1::2], c["boxes"], strict=True):
                    assert by_box[tuple(box)].text in turn["value"].lower()


def test_cli_world_then_data_check(tmp_path, capsys):
    out = tmp_path / "W"
    metrics = tmp_path / "metrics.jsonl"
    argv = ["world", "--out", str(out), "--train", "200", "--eval", "50", "--seed", "1", "--quiet"]
    assert main([*argv, "--metrics", str(metrics)]) == 0
    (line,) = metrics.read_text().splitlines()
    assert json.loads(line)["counts"]["train"]["images"] == 200 and json.loads(line)["seconds"] > 0
    assert main(["data", "check", str(out)]) == 0
    assert "no problems" in capsys.readouterr().out
    log = ProblemLog(strict=True)
    recs = read_region_jsonl(out / "train" / "regions.jsonl", log)
    convs = read_conversations(out / "eval" / "conversations.json", log)
    assert len(recs) == 200 and len(convs) >= 50
    with Image.open(recs[0].image_path) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    # Break one image: the check now fails and names it.
    Path(recs[3].image_path).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["data", "check", str(out)]) == 1
    assert "000003.png" in capsys.readouterr().out
