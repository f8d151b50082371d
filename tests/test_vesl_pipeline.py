"""VESL end to end on real photos with a tiny random OWLv2: shards, stats, resume, kill, inputs, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from clocmllm.data.problems import ProblemLog
from clocmllm.data.regions import read_region_jsonl
from clocmllm.vesl.detector import OwlDetector
from clocmllm.vesl.pipeline import label
from clocmllm.vesl.random_owl import build_random_owl

os.environ["HF_HUB_OFFLINE"] = "1"

# Tiny models on a shared 2-core box: one torch thread (see conftest.py) keeps timings steady.
pytestmark = pytest.mark.usefixtures("torch_one_thread")

PHOTOS = {
    "astronaut": "A woman in a white space suit holding an American flag.",
    "coffee": "A cup of coffee on a wooden table with a silver spoon.",
    "chelsea": "A tabby cat lying on a red blanket.",
    "rocket": "A tall rocket on the launch pad under a blue sky.",
    "camera": "A man with a camera on a tripod in a grassy field.",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("vesl")
    images = root / "images"
    images.mkdir()
    with open(root / "captions.jsonl", "w") as f:
        for name, caption in PHOTOS.items():
            Image.fromarray(getattr(data, name)()).save(images / f"{name}.jpg")
            f.write(json.dumps({"image": f"images/{name}.jpg", "caption": caption}) + "\n")
    (images / "broken.jpg").write_bytes(b"this is not a jpeg")
    owl = build_random_owl(root / "owlv2")
    detector = OwlDetector(owl, image_size=64, threshold=0.3)
    return {
        "root": root,
        "images": images,
        "captions": root / "captions.jsonl",
        "owl": owl,
        "detector": detector,
    }


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.jsonl"))


def test_folder_pipeline_writes_valid_shards_and_lists_skips(world, tmp_path) -> None:
    out = tmp_path / "out"
    s = label(
        out,
        detector=world["detector"],
        images=world["images"],
        captions=world["captions"],
        shard_size=2,
        batch_size=2,
        progress=False,
    )
    assert s.shards_total == 3 and s.shards_done_now == [0, 1, 2]
    assert s.images == 6 and s.skipped_images == 1
    records = []
    for shard in _shards(out):
        records += read_region_jsonl(shard, ProblemLog(strict=True))  # strict: any bad field raises
    assert sorted(Path(r.image).stem for r in records) == sorted(PHOTOS)
    assert sum(len(r.regions) for r in records) == s.regions > 0
    for r in records:
        assert Path(r.image_path).is_file()
        with Image.open(r.image_path) as im:
            assert im.size == (r.width, r.height)
        assert r.caption == PHOTOS[Path(r.image).stem]
        assert all(reg.text in r.extra["phrases"] and reg.extra["score"] >= 0.3 for reg in r.regions)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.stats.json"))]
    skipped = [x for st in stats for x in st["skipped"]]
    assert [x["image"] for x in skipped] == ["broken.jpg"] and "unreadable" in skipped[0]["reason"]
    assert sum(st["regions"] for st in stats) == s.regions
    assert sum(sum(st["phrase_counts"].values()) for st in stats) == s.regions
    metrics = (out / "metrics-0-of-1.jsonl").read_text().splitlines()
    assert [json.loads(m)["shard"] for m in metrics] == [0, 1, 2]

    # rerun: nothing redone, files untouched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    s2 = label(
        out,
        detector=world["detector"],
        images=world["images"],
        captions=world["captions"],
        shard_size=2,
        progress=False,
    )
    assert s2.shards_done_now == [] and s2.shards_skipped == [0, 1, 2]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="planned"):
        label(
            out, detector=world["detector"], images=world["images"], captions=world["captions"], shard_size=3
        )


def test_crash_mid_shard_leaves_no_finished_looking_shard(world, tmp_path) -> None:
    out = tmp_path / "out"
    calls = []

    def flaky(img: Image.Image) -> str:  # a captioner that dies on its 4th image
        calls.append(img.size)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return "a red apple on a green plate"

    with pytest.raises(RuntimeError, match="boom"):
        label(
            out,
            detector=world["detector"],
            images=world["images"],
            captioner=flaky,
            shard_size=2,
            batch_size=1,
            progress=False,
        )
    assert (out / "shard-00000.stats.json").is_file() and (out / "shard-00001.stats.json").is_file()
    assert not (out / "shard-00002.stats.json").exists() and not (out / "shard-00002.jsonl").exists()
    done = (out / "shard-00000.stats.json").stat().st_mtime_ns
    s = label(
        out,
        detector=world["detector"],
        images=world["images"],
        captioner=lambda im: "a red apple",
        shard_size=2,
        progress=False,
    )
    assert s.shards_done_now == [2] and s.shards_skipped == [0, 1]
    assert (out / "shard-00000.stats.json").stat().st_mtime_ns == done


def test_split_over_processes_is_a_partition(world, tmp_path) -> None:
    out = tmp_path / "out"
    kw = dict(
        detector=world["detector"],
        images=world["images"],
        captions=world["captions"],
        shard_size=1,
        progress=False,
    )
    a = label(out, shard_index=0, num_shards=2, **kw)
    b = label(out, shard_index=1, num_shards=2, **kw)
    assert a.shards_done_now == [0, 2, 4] and b.shards_done_now == [1, 3, 5]
    keys = [json.loads(line)["image"] for p in _shards(out) for line in p.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(PHOTOS)


def test_list_and_hf_dataset_inputs(world, tmp_path) -> None:
    import datasets

    lst = tmp_path / "list.jsonl"
    lst.write_text(
        "".join(
            json.dumps({"image": str(world["images"] / f"{n}.jpg"), "caption": c}) + "\n"
            for n, c in list(PHOTOS.items())[:2]
        )
    )
    s = label(tmp_path / "a", detector=world["detector"], list_file=lst, progress=False)
    assert s.images == 2 and s.skipped_images == 0

    photos = [Image.open(world["images"] / f"{n}.jpg") for n in list(PHOTOS)[:3]]
    ds = datasets.Dataset.from_dict(
        {"image": photos, "caption": list(PHOTOS.values())[:3]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "b"
    s = label(out, detector=world["detector"], hf_dataset=tmp_path / "ds", shard_size=2, progress=False)
    assert s.images == 3 and s.skipped_images == 0
    recs = [r for p in _shards(out) for r in read_region_jsonl(p, ProblemLog(strict=True))]
    assert [r.image for r in recs] == [
        "images/shard-00000/0.png",
        "images/shard-00000/1.png",
        "images/shard-00001/2.png",
    ]
    with Image.open(recs[2].image_path) as im:
        assert im.size == photos[2].size


def _label_args(world, out: Path, *extra: str) -> list[str]:
    """`clocmllm label ...` arguments for the test world: one image a shard, tiny detector input."""
    return ["label", "--images", str(world["images"]), "--captions", str(world["captions"]),
            "--detector", str(world["owl"]), "--out", str(out), "--shard-size", "1", "--batch-size", "1",
            "--image-size", "64", "--threshold", "0.3", "--no-progress", *extra]  # fmt: skip


def _run_cli(world, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clocmllm", *_label_args(world, out, *extra)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def test_cli_killed_after_first_shard_resumes(world, tmp_path) -> None:
    out = tmp_path / "out"
    proc = _run_cli(world, out)
    deadline = time.time() + 60
    while not (out / "shard-00000.stats.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    first = (out / "shard-00000.jsonl").stat().st_mtime_ns
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.stats.json")}
    # no shard looks finished without its records
    for stats in out.glob("shard-*.stats.json"):
        assert stats.with_name(stats.name.replace(".stats.json", ".jsonl")).is_file()
    from clocmllm.cli import main

    assert main(_label_args(world, out)) == 0
    assert (out / "shard-00000.jsonl").stat().st_mtime_ns == first
    assert len(list(out.glob("shard-*.stats.json"))) == 6
    # shards finished before the kill were not redone (their done-markers are untouched) ...
    assert all((out / name).stat().st_mtime_ns == t for name, t in finished.items())
    # ... and no shard was labelled twice. (The metrics log is appended after a shard's marker,
    # so a kill between the two can leave a finished shard without its log line: count <= 1.)
    metrics = [json.loads(x) for m in out.glob("metrics-*.jsonl") for x in m.read_text().splitlines()]
    counts = Counter(m["shard"] for m in metrics)
    assert all(c == 1 for c in counts.values()) and set(counts) >= {
        k for k in range(6) if f"shard-{k:05d}.stats.json" not in finished
    }


@pytest.mark.slow
def test_pretrain_runs_on_vesl_labels(world, tmp_path) -> None:
    """The shards feed `clocmllm pretrain` directly (2 steps of the tiny CLOC recipe). Slow (JAX start-up
    and compile in a subprocess: ~100 s on the loaded 2-core box), so marked `slow`."""
    out = tmp_path / "labels"
    label(
        out,
        detector=world["detector"],
        images=world["images"],
        captions=world["captions"],
        shard_size=3,
        progress=False,
    )
    recipe = Path(__file__).resolve().parents[1] / "scripts" / "recipes" / "tiny_cloc.yaml"
    cmd = [
        sys.executable,
        "-m",
        "clocmllm",
        "pretrain",
        "--config",
        str(recipe),
        "--workdir",
        str(tmp_path / "run"),
        "--data",
        str(out),
        "--steps",
        "2",
        "--no-progress",
    ]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (tmp_path / "run").is_dir() and any((tmp_path / "run").iterdir())


class _DetectOnly:
    """A detector with nothing but `detect` (the protocol's minimum): no loader-side preparation."""

    def __init__(self, inner: OwlDetector):
        self.inner = inner

    def detect(self, images, phrases):
        return self.inner.detect(images, phrases)


def _outputs(out: Path) -> dict[str, object]:
    """Every output file's content, stats without their timings."""
    got: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "plan.json" and not p.name.startswith("metrics-"):
            if p.name.endswith(".stats.json"):
                stats = json.loads(p.read_text())
                got[p.name] = {k: v for k, v in stats.items() if k not in ("seconds", "model_seconds")}
            else:
                got[p.relative_to(out).as_posix()] = p.read_bytes()
    return got


@pytest.mark.parametrize("mode", ["captions", "captioner", "detect_only"])
def test_prefetch_across_shards_gives_the_inline_result(world, tmp_path, mode: str) -> None:
    """The loader thread (prefetch 2) against everything inline (prefetch 0): identical files, with
    shards of 1-3 images so that the unreadable image (sorted second) sits at a shard boundary."""
    detector = _DetectOnly(world["detector"]) if mode == "detect_only" else world["detector"]
    given = {"captioner": (lambda im: f"a red apple next to a {im.size[0]} pixel wide box")}
    if mode != "captioner":
        given = {"captions": world["captions"]}
    configs = {"captions": ((1, 1), (2, 2), (3, 2)), "captioner": ((1, 1),), "detect_only": ((2, 2),)}
    for shard_size, batch_size in configs[mode]:
        outs = []
        for prefetch in (0, 2):
            out = tmp_path / f"{shard_size}-{prefetch}"
            s = label(
                out,
                detector=detector,
                images=world["images"],
                shard_size=shard_size,
                batch_size=batch_size,
                prefetch=prefetch,
                progress=False,
                **given,
            )
            assert s.images == 6 and s.skipped_images == 1 and s.regions > 0
            if mode == "captions":  # model time is the forward passes, inside their stage's time
                assert s.stages["detector_model"]["wall"] >= s.model_seconds - 1e-3 > 0
            outs.append(_outputs(out))
        assert outs[0] == outs[1]
        assert len([k for k in outs[0] if k.endswith(".stats.json")]) == -(-6 // shard_size)


def test_loader_prepares_next_shard_while_model_runs(world, tmp_path) -> None:
    """Shard 1's first image is decoded while the model still runs on shard 0's last batch (the
    forward pass below waits for it; without cross-shard prefetch it would time out), and the
    loader opens images in input order."""
    import threading

    from clocmllm.vesl.sources import folder_source

    source = folder_source(world["images"])
    opened: list[str] = []
    second_shard_started = threading.Event()
    for i, item in enumerate(source.items):

        def spy(item=item, i=i, real=item.open):
            opened.append(item.key)
            if i == 2:
                second_shard_started.set()
            return real()

        item.open = spy
    inner = world["detector"]
    waited: list[bool] = []

    class Blocking:
        prepare, postprocess = inner.prepare, inner.postprocess

        @staticmethod
        def forward(inputs):
            if not waited:  # shard 0's last (only) batch
                waited.append(second_shard_started.wait(timeout=20))
            return inner.forward(inputs)

    s = label(
        tmp_path / "out",
        detector=Blocking(),
        source=source,
        captions=world["captions"],
        shard_size=2,
        batch_size=2,
        progress=False,
    )
    assert waited == [True]
    assert opened == [it.key for it in source.items]
    assert s.shards_done_now == [0, 1, 2] and s.images == 6
    assert set(s.loader_stages) >= {"decode", "phrases", "detector_prepare"}


def test_loader_error_stops_cleanly_after_finished_shards(world, tmp_path) -> None:
    """An error in the loader thread (here the phrase extractor on shard 1's caption) surfaces in
    the caller when that batch is reached: earlier shards are finished, the failing one is not,
    the thread is gone, and a rerun completes the rest."""
    import threading

    from clocmllm.vesl.phrases import PhraseExtractor

    real = PhraseExtractor()

    def fragile(caption: str) -> list[str]:
        if "camera" in caption:  # camera.jpg: sorted third, the first image of shard 1
            raise RuntimeError("tagger broke")
        return real(caption)

    out = tmp_path / "out"
    kw = dict(detector=world["detector"], images=world["images"], captions=world["captions"], shard_size=2)
    with pytest.raises(RuntimeError, match="tagger broke"):
        label(out, extractor=fragile, batch_size=1, progress=False, **kw)
    assert (out / "shard-00000.stats.json").is_file()
    assert not (out / "shard-00001.stats.json").exists() and not (out / "shard-00001.jsonl").exists()
    assert not any(t.name.startswith("vesl-loader") for t in threading.enumerate())
    s = label(out, extractor=real, progress=False, **kw)
    assert s.shards_skipped == [0] and s.shards_done_now == [1, 2]
