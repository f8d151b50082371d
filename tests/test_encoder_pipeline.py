"""Input pipeline (numpy side, no jax): letterbox geometry, region sampling, bad images, determinism."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clocmllm.data.problems import DataError, ProblemLog
from clocmllm.data.regions import Region, RegionRecord, write_region_jsonl
from clocmllm.encoder.input_pipeline import (
    BatchIterator,
    PipelineConfig,
    RegionDataset,
    load_records,
    phrase_length,
    sample_regions,
    trim_captions,
    trim_region_text,
)
from clocmllm.encoder.preprocess import letterbox_image, pad_value, preprocess_image

RED = (255, 0, 0)


def fake_tokenize(texts):
    """Deterministic stand-in tokenizer: char codes, EOT=3, context 8."""
    out = np.zeros((len(texts), 8), np.int32)
    for i, t in enumerate(texts):
        ids = [4 + (ord(c) % 50) for c in t[:6]] + [3]
        out[i, : len(ids)] = ids
    return out


def make_data(tmp_path, n=6, regions_per=(1, 3, 5), corrupt=()):
    (tmp_path / "images").mkdir()
    recs = []
    for i in range(n):
        w, h = (90, 50) if i % 2 else (40, 70)
        im = Image.new("RGB", (w, h), (0, 0, 200))
        k = regions_per[i % len(regions_per)]
        regs = []
        for j in range(k):
            box = [2.0 + j, 3.0 + j, min(w, 20.0 + 3 * j), min(h, 25.0 + 2 * j)]
            regs.append(Region(box, f"thing {i} {j}"))
        ImageDraw.Draw(im).rectangle([10, 10, 30, 30], fill=RED)
        name = f"images/{i}.png"
        if i in corrupt:
            (tmp_path / name).write_bytes(b"not a png")
        else:
            im.save(tmp_path / name)
        recs.append(RegionRecord(name, f"caption {i}", regs, w, h))
    write_region_jsonl(recs, tmp_path / "regions.jsonl")
    return tmp_path / "regions.jsonl"


@pytest.mark.parametrize("size_wh", [(120, 60), (50, 130), (77, 77)])
def test_box_covers_same_pixels_after_letterbox(size_wh):
    w, h = size_wh
    box = [0.3 * w, 0.2 * h, 0.7 * w, 0.9 * h]
    im = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(im).rectangle(
        [round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1], fill=RED
    )
    pixels, geom = letterbox_image(im, 64)
    x1, y1, x2, y2 = geom.to_model(box)
    red = (pixels[..., 0] > 128) & (pixels[..., 2] < 100)
    ys, xs = np.nonzero(red)
    # the red area after preprocessing lies where the mapped box says, to within one pixel
    assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
    assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1
    # interior pixels of the mapped box are all red; the padding is the mean colour
    assert red[int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1].all()
    rw, rh = geom.resized
    norm, _ = preprocess_image(im, 64)
    if rw < 64:
        np.testing.assert_allclose(norm[:, rw:], np.broadcast_to(pad_value(), norm[:, rw:].shape), atol=1e-6)
        assert np.abs(norm[:, rw:]).max() < 0.02
    if rh < 64:
        assert np.abs(norm[rh:]).max() < 0.02


def test_sample_regions_without_replacement():
    rng = np.random.default_rng(0)
    got = sample_regions(10, 4, rng)
    assert len(got) == 4 and len(set(got)) == 4 and all(0 <= j < 10 for j in got)
    assert sample_regions(2, 4, rng) == [0, 1]
    draws = {tuple(sample_regions(6, 2, np.random.default_rng(s))) for s in range(30)}
    assert len(draws) > 5  # actually random


def test_batch_shapes_padding_and_valid_mask(tmp_path):
    path = make_data(tmp_path)
    ds = RegionDataset(
        load_records(path), PipelineConfig(image_size=32, batch_size=6, num_regions=4, seed=1), fake_tokenize
    )
    b = ds.batch(0)
    assert b["images"].shape == (6, 32, 32, 3) and b["images"].dtype == np.float32
    assert b["text"].shape == (6, 8) and b["region_text"].shape == (6, 4, 8)
    counts = {i: len(ds.records[i].regions) for i in range(6)}
    for row, idx in enumerate(b["index"]):
        n_valid = int(b["region_valid"][row].sum())
        assert n_valid == min(4, counts[int(idx)])
        assert (b["region_text"][row, n_valid:] == 0).all()  # padded slots carry no text
        assert (b["region_text"][row, :n_valid, 0] > 0).all()
        boxes = b["region_boxes"][row, :n_valid]
        assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2] > boxes[:, 0]).all()
    # every record appears exactly once in the first epoch's batch
    assert sorted(b["index"].tolist()) == list(range(6))


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    path = make_data(tmp_path, n=5)
    cfg = PipelineConfig(image_size=32, batch_size=3, num_regions=2, seed=7)
    a = RegionDataset(load_records(path), cfg, fake_tokenize)
    it = BatchIterator(a, start_step=0)
    seq = [next(it) for _ in range(5)]
    it.close()
    assert it.step == 5
    # a fresh dataset resumed at step 3 yields exactly the batches 3 and 4
    b = RegionDataset(load_records(path), cfg, fake_tokenize)
    it2 = BatchIterator(b, start_step=3)
    for s in (3, 4):
        got = next(it2)
        for k in got:
            np.testing.assert_array_equal(got[k], seq[s][k])
    it2.close()
    other = RegionDataset(
        load_records(path), PipelineConfig(image_size=32, batch_size=3, num_regions=2, seed=8), fake_tokenize
    )
    assert not all(np.array_equal(other.batch(s)["index"], seq[s]["index"]) for s in range(5))


def test_corrupt_image_skipped_and_counted(tmp_path):
    path = make_data(tmp_path, n=6, corrupt=(2,))
    problems = ProblemLog()
    ds = RegionDataset(
        load_records(path, problems=problems),
        PipelineConfig(image_size=32, batch_size=6, num_regions=2),
        fake_tokenize,
        problems,
    )
    b = ds.batch(0)
    assert 2 not in b["index"].tolist() and len(b["index"]) == 6
    assert problems.skipped == 1 and "2.png" in problems.problems[0].file
    assert problems.problems[0].field == "image"
    ds.batch(1)
    assert problems.skipped == 1  # reported once, not at every encounter


def test_corrupt_image_strict_raises(tmp_path):
    path = make_data(tmp_path, n=4, corrupt=(1,))
    problems = ProblemLog(strict=True)
    ds = RegionDataset(
        load_records(path, problems=problems),
        PipelineConfig(image_size=32, batch_size=4),
        fake_tokenize,
        problems,
    )
    with pytest.raises(DataError, match=r"1\.png: image: cannot decode"):
        ds.batch(0)


def test_shard_folder_and_world_split(tmp_path):
    path = make_data(tmp_path, n=3)
    shards = tmp_path / "shards"
    shards.mkdir()
    recs = load_records(path)
    for r in recs:
        r.image = str(tmp_path / r.image)
    write_region_jsonl(recs[:2], shards / "a.jsonl")
    write_region_jsonl(recs[2:], shards / "b.jsonl")
    assert [r.caption for r in load_records(shards)] == ["caption 0", "caption 1", "caption 2"]
    world = tmp_path / "world"
    write_region_jsonl(recs[:1], world / "train" / "regions.jsonl")
    write_region_jsonl(recs[1:], world / "eval" / "regions.jsonl")
    assert len(load_records(world, "train")) == 1 and len(load_records(world, "eval")) == 2
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing")


def test_trim_captions_keeps_every_first_eot_and_only_grows():
    eot = 3
    text = np.zeros((3, 77), np.int32)
    text[0, :5] = [1, 7, 8, 9, eot]
    text[1, :11] = [1, *range(10, 19), eot]  # EOT at 10 -> needs 11 -> bucket 12
    text[2, :3] = [1, 7, eot]
    batch = {"text": text, "images": np.zeros((3, 4, 4, 3), np.float32)}
    out = trim_captions(batch, eot)
    assert out["text"].shape == (3, 12) and (out["text"] == text[:, :12]).all()
    assert out["images"] is batch["images"]
    assert trim_captions(batch, eot, floor=13)["text"].shape == (3, 16)  # the run's longest so far
    assert trim_captions(batch, eot, floor=70)["text"] is text  # no bucket below T: untouched
    # a caption without EOT pools at its last position: keep the full length
    no_eot = text.copy()
    no_eot[2] = 5
    assert trim_captions({"text": no_eot}, eot)["text"].shape == (3, 77)


def test_trim_region_text_keeps_every_valid_first_eot():
    eot = 3
    tok = np.zeros((2, 3, 16), np.int32)
    tok[0, 0, :5] = [1, 7, 8, 9, eot]  # EOT at 4 -> needs 5
    tok[0, 1, :3] = [1, 7, eot]
    tok[1, 0, :7] = [1, 7, 8, 9, 10, 11, eot]  # needs 7 -> bucket 8
    tok[1, 1, :] = 5  # invalid row without EOT: ignored
    valid = np.array([[True, True, False], [True, False, False]])
    assert phrase_length(tok, valid, eot) == 7
    batch = {"region_text": tok, "region_valid": valid, "text": np.zeros((2, 16), np.int32)}
    out = trim_region_text(batch, eot)
    assert out["region_text"].shape == (2, 3, 8)
    assert (out["region_text"] == tok[..., :8]).all() and out["text"] is batch["text"]
    # a valid row without EOT pools at its last position: keep the full length
    valid[1, 1] = True
    assert phrase_length(tok, valid, eot) == 16
    assert trim_region_text({**batch, "region_valid": valid}, eot)["region_text"].shape[-1] == 16
    # buckets never exceed T, and no region text means nothing to do
    short = {"region_text": tok[..., :6], "region_valid": np.zeros((2, 3), bool)}
    assert trim_region_text(short, eot)["region_text"].shape[-1] == 4
    assert trim_region_text({"text": batch["text"]}, eot) == {"text": batch["text"]}
    # a floor: at least its bucket (all rows invalid would need only 4)
    none_valid = {**batch, "region_valid": np.zeros_like(valid)}
    assert trim_region_text(none_valid, eot, floor=9)["region_text"].shape[-1] == 12
    assert trim_region_text(short, eot, floor=9)["region_text"].shape[-1] == 6  # never above T


_FAULTS_SCRIPT = """
import ctypes, ctypes.util, resource, sys
if sys.argv[1] == "tuned":
    from clocmllm.encoder.host_malloc import reuse_freed_memory
    assert reuse_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def work():  # what a synchronous XLA step does: a big temp buffer from the calling thread
    n = 100 << 20
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
counts = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(counts[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_malloc_tuning_reuses_a_big_freed_buffer():
    """host_malloc: the third 100 MB allocation re-faults ~24k pages without it (glibc maps
    blocks above 32 MB afresh each time), ~0 with it."""
    runs = {}
    for mode in ("glibc", "tuned"):
        env = {**os.environ, "CLOCMLLM_MALLOC_TUNING": "1"}
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr
        runs[mode] = int(out.stdout.split()[-1])
    assert runs["glibc"] > 20_000  # 100 MB / 4 KiB pages, faulted in again
    assert runs["tuned"] < 1_000


_XLA_TEMP_SCRIPT = """
import resource, sys
if sys.argv[1] == "trainer":  # what train() does on the CPU (malloc: auto)
    from clocmllm.encoder.host_malloc import reuse_freed_memory, synchronous_cpu_client
    assert reuse_freed_memory()
    synchronous_cpu_client()
import jax, jax.numpy as jnp
@jax.jit
def f(x):
    y = x @ x.T  # a 64 MB temporary, in XLA's per-execution temp buffer
    return jnp.sum(jnp.tanh(y) @ x)
x = jnp.ones((4096, 32), jnp.float32) / 64
f(x).block_until_ready()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
start, faults = rss(), []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[1:]), (rss() - start) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_trainer_cpu_settings_keep_xla_temp_buffer_in_place():
    """An XLA program's 64 MB temporary is page-faulted in again on every call with glibc's
    defaults (~16k faults); with the trainer's CPU settings it is reused, and RSS stays flat."""
    runs = {}
    for mode in ("glibc", "trainer"):
        env = {**os.environ, "CLOCMLLM_MALLOC_TUNING": "1", "JAX_PLATFORMS": "cpu"}
        out = subprocess.run(
            [sys.executable, "-c", _XLA_TEMP_SCRIPT, mode], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr
        runs[mode] = [int(v) for v in out.stdout.split()[-2:]]
    assert runs["glibc"][0] > 10_000, runs
    faults, growth_mb = runs["trainer"]
    assert faults < 500 and growth_mb < 16, runs


def test_malloc_rule_follows_the_jax_platform(monkeypatch):
    """`malloc: auto` tunes when JAX computes on the CPU only; explicit modes win; typos fail."""
    from clocmllm.encoder import trainer
    from clocmllm.encoder.host_malloc import jax_will_run_on_cpu
    from clocmllm.encoder.trainer import wants_malloc_reuse

    assert jax_will_run_on_cpu("cpu") and jax_will_run_on_cpu("CPU,cuda")
    assert not jax_will_run_on_cpu("cuda,cpu") and not jax_will_run_on_cpu("tpu")
    for on_cpu in (True, False):
        monkeypatch.setattr(trainer, "jax_will_run_on_cpu", lambda on_cpu=on_cpu: on_cpu)
        assert wants_malloc_reuse("auto") is on_cpu
        assert wants_malloc_reuse("reuse") and not wants_malloc_reuse("glibc")
    with pytest.raises(ValueError, match="malloc"):
        wants_malloc_reuse("tcmalloc")
