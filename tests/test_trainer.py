"""Trainer: optimizer masks and schedule, kill-and-resume exactness, NaN stop, refused resume.

Runs go through the real CLI in subprocesses (so SIGKILL is real) with a micro model and a
shared JAX compilation cache, so the train step compiles once for the whole module.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from micro import MICRO_MODEL, jax_cli_env

RECIPE = {
    "mode": "cloc",
    "steps": 8,
    "seed": 0,
    "progress": False,
    "model": {"preset": "tiny", **MICRO_MODEL},
    "data": {"batch_size": 8, "num_regions": 2, "threads": 1},
    "optim": {"lr": 3e-3, "warmup_steps": 1},
    "checkpoint": {"every": 2, "keep": 10},
    "log_every": 1,
    "eval": {"at_end": False},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from clocmllm.data.world import generate_world

    root = tmp_path_factory.mktemp("trainer")
    generate_world(root / "world", train=16, eval=4, seed=0, image_size=32, progress=False)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    env = jax_cli_env()
    return root, env


def cli(setup, workdir, *extra, wait=True):
    root, env = setup
    cmd = [sys.executable, "-m", "clocmllm", "pretrain", "--config", str(root / "recipe.yaml"), "--workdir", str(workdir),
           "--data", str(root / "world"), *extra]  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_a(setup):
    """The uninterrupted reference run."""
    workdir = setup[0] / "a"
    proc = cli(setup, workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return workdir


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_decay_mask_excludes_norms_biases_embeddings_scales():
    import jax

    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.models.clip import param_shapes
    from clocmllm.encoder.optimizer import decay_mask

    shapes = param_shapes(load_model_config("tiny", MICRO_MODEL))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(shapes))}
    assert flat["['visual']['layer_0']['attn']['qkv']['kernel']"] is True
    assert flat["['visual']['patch_embed']['kernel']"] is True
    assert flat["['text']['proj']['kernel']"] is True
    for name in (
        "['logit_scale']",
        "['logit_bias']",
        "['visual']['class_embedding']",
        "['visual']['pos_embed']",
        "['text']['token_embed']['embedding']",
        "['visual']['layer_0']['ln1']['scale']",
        "['visual']['layer_0']['attn']['qkv']['bias']",
        "['prompter']['box_embed']['corner_embed']",
    ):
        assert flat[name] is False, name
    assert sum(flat.values()) >= 10


def test_lr_schedule_warmup_then_cosine():
    from clocmllm.encoder.optimizer import lr_schedule

    s = lr_schedule({"lr": 1.0, "warmup_steps": 10, "end_lr": 0.0}, 110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.5, abs=1e-3)  # cosine midpoint
    assert float(s(110)) == pytest.approx(0.0, abs=1e-6)


def test_sigkill_then_resume_matches_uninterrupted(setup, run_a):
    from clocmllm.encoder.checkpoints import restore_params

    workdir = setup[0] / "b"
    proc = cli(setup, workdir, "--set", "debug.step_delay_s=0.5", wait=False)
    target = workdir / "checkpoints" / "4"
    deadline = time.time() + 200
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.is_dir(), "no checkpoint appeared: " + (
        proc.stdout.read() if proc.poll() is not None else ""
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "checkpoints" / "8").exists()  # really interrupted
    resumed = cli(setup, workdir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads(resumed.stdout[resumed.stdout.index("{") :])["resumed_from"] >= 4
    cfg_a, pa, step_a = restore_params(run_a)
    cfg_b, pb, step_b = restore_params(workdir)
    assert step_a == step_b == 8
    import jax

    # bit for bit: the resumed run starts from the checkpoint's shape floors (meta["prep"],
    # encoder/batch_prep.py), so its steps run the uninterrupted run's programs on its batches
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves(pb), strict=True
    ):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    steps = [m["step"] for m in metrics(workdir) if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # resumed history has no duplicates
    assert [m["loss"] for m in metrics(workdir) if "loss" in m] == [
        m["loss"] for m in metrics(run_a) if "loss" in m
    ]
    meta = json.loads((workdir / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["prep"]["caption_len"] > 0 and meta["prep"]["dedup_rows"] > 0, meta


def test_reference_run_learns_and_writes_outputs(run_a):
    rows = [m for m in metrics(run_a) if "loss" in m]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in (
        "clip_loss", "region_loss", "ground_loss", "lr", "grad_norm", "images_per_s", "step_time", "model_tflops_per_s"
    ):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"]  # the tiny model fits its 16 images
    assert (run_a / "loss.png").stat().st_size > 1000
    cfg = yaml.safe_load((run_a / "config.yaml").read_text())
    assert (
        cfg["model"]["vision_layers"] == 1 and cfg["mode"] == "cloc" and (run_a / cfg["tokenizer"]).is_file()
    )


def test_packed_text_run_matches_the_unpacked_run(setup, run_a):
    """The trainer with captions and phrases packed into rows (encoder/text_packing.py; `auto`
    leaves them unpacked at these widths, so forced on here) takes the same steps as the
    reference run, to rounding."""
    workdir = setup[0] / "packed"
    proc = cli(setup, workdir, "--set", "data.pack_phrases=true", "--set", "data.pack_captions=true")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ref = {m["step"]: m for m in metrics(run_a) if "loss" in m}
    got = {m["step"]: m for m in metrics(workdir) if "loss" in m}
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step, m in ref.items():
        for key in ("loss", "clip_loss", "region_loss", "grad_norm"):
            assert abs(got[step][key] - m[key]) <= 1e-4 * max(1.0, abs(m[key])), (
                step,
                key,
                got[step][key],
                m[key],
            )
    bad = cli(setup, setup[0] / "bad", "--set", "data.pack_phrases=sometimes")
    assert bad.returncode != 0 and "data.pack_phrases" in bad.stdout + bad.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup):
    from clocmllm.encoder.checkpoints import restore_params

    workdir = setup[0] / "nan"
    proc = cli(setup, workdir, "--set", "debug.nan_at_step=5")
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "non-finite" in out and "step 5" in out and "Last good checkpoint: step 4" in out
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 4]
    _, params, step = restore_params(workdir)
    assert step == 4
    import jax

    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_incompatible_resume_is_refused(setup, run_a):
    before = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    proc = cli(setup, run_a, "--set", "model.vision_layers=2", "--set", "mode=clip", "--steps", "10")
    assert proc.returncode == 1
    assert "model.vision_layers (1 -> 2)" in proc.stdout and "mode (cloc -> clip)" in proc.stdout
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == before
    assert yaml.safe_load((run_a / "config.yaml").read_text())["model"]["vision_layers"] == 1


def test_a_model_field_added_after_a_save_reads_as_its_default():
    from clocmllm.encoder.trainer import incompatible_keys

    old = {"mode": "cloc", "loss": "softmax", "model": {"vision_layers": 1}}  # saved before the field
    assert incompatible_keys(old, {**old, "model": {"vision_layers": 1, "prompter_box_mask": False}}) == []
    assert incompatible_keys(old, {**old, "model": {"vision_layers": 1, "prompter_box_mask": True}}) == [
        "model.prompter_box_mask (False -> True)"
    ]


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_cloc", "b16_cloc", "l14_cloc"])
def test_recipes_resolve(name):
    from clocmllm.encoder.trainer import apply_overrides, load_recipe, resolve_config

    root = Path(__file__).resolve().parents[1] / "scripts" / "recipes"
    cfg = resolve_config(
        apply_overrides(load_recipe(root / f"{name}.yaml"), ["model.vision_layers=3", "optim.lr=0.1"])
    )
    assert cfg["model"]["vision_layers"] == 3 and cfg["optim"]["lr"] == 0.1
    assert cfg["mode"] == name.split("_")[1] if name.startswith("tiny") else cfg["mode"] == "cloc"
    with pytest.raises(ValueError, match="unknown key"):
        resolve_config({**load_recipe(root / f"{name}.yaml"), "optimiser": {}})


@pytest.mark.parametrize(
    ("recipe", "extra", "metric"),
    [
        ("rocket", ["--set", "rocket.num_views=1"], "rocket_aug_loss"),
        (
            "lcl",
            [
                "--set",
                "mode=clip",
                "--set",
                "lcl.max_images=8",
                "--set",
                "lcl.seq_len=48",
                "--set",
                "lcl.lm.max_len=48",
                "--set",
                "lcl.lm.width=32",
                "--set",
                "lcl.lm.mlp_dim=64",
                "--set",
                "lcl.lm.layers=1",
            ],
            "lcl_lm_loss",
        ),  # fmt: skip
    ],
)
def test_recipes_run_through_the_trainer(setup, recipe, extra, metric):
    from clocmllm.encoder.checkpoints import restore_params

    workdir = setup[0] / recipe
    proc = cli(setup, workdir, "--set", f"recipe={recipe}", "--steps", "2", *extra)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [m for m in metrics(workdir) if "loss" in m]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r[metric]) for r in rows)
    cfg, params, step = restore_params(workdir)
    assert step == 2 and cfg["recipe"] == recipe and recipe in params and "visual" in params
    # every recipe's vision tower exports through the same adapters, parity-checked
    from clocmllm.adapters.export import export_encoder

    report = export_encoder(workdir, setup[0] / f"{recipe}_export", verbose=False)
    assert (
        report["parity"]["max_abs_diff"] <= 1e-4
        and (setup[0] / f"{recipe}_export" / "model.safetensors").exists()
    )


def test_recipes_pretrain_on_an_interleaved_jsonl(setup):
    """MMC4/OBELICS-like documents: LCL reads them as documents, the paired recipes (CLOC,
    clip-rocket) as (image, neighbouring text) pairs without regions."""
    from clocmllm.data.interleaved import (
        InterleavedDoc,
        Segment,
        read_interleaved_jsonl,
        write_interleaved_jsonl,
    )
    from clocmllm.data.regions import read_region_jsonl

    root = setup[0]
    recs = read_region_jsonl(root / "world" / "train" / "regions.jsonl")
    docs = [
        InterleavedDoc(
            [Segment(text=f"document {i} begins."), Segment(image=r.image_path), Segment(text=r.caption)]
        )
        for i, r in enumerate(recs)
    ]
    path = root / "docs" / "docs.jsonl"
    write_interleaved_jsonl(docs, path)
    assert len(read_interleaved_jsonl(path)) == len(recs)
    lcl = ["--set", "recipe=lcl", "--set", "mode=clip", "--set", "lcl.max_images=8", "--set", "lcl.seq_len=48",
           "--set", "lcl.lm.max_len=48", "--set", "lcl.lm.width=32", "--set", "lcl.lm.mlp_dim=64",
           "--set", "lcl.lm.layers=1"]  # fmt: skip
    rocket = ["--set", "recipe=rocket", "--set", "rocket.num_views=1"]  # mode cloc: region terms on
    for name, extra in (("lcl_docs", lcl), ("cloc_docs", []), ("rocket_docs", rocket)):
        workdir = root / name
        proc = cli(setup, workdir, "--steps", "2", *extra, "--data", str(path))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        rows = [m for m in metrics(workdir) if "loss" in m]
        assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_resume_continues_from_the_saved_shape_floors(setup, run_a):
    """A resumed run reads the checkpoint's `meta["prep"]` (encoder/batch_prep.py): a packed
    row count above what the data needs is kept to the end (a run starting from zero would
    use fewer rows), and a bad floor is refused by name before any step."""
    import shutil

    def resume_from_4(name, prep):
        workdir = setup[0] / name
        shutil.copytree(run_a, workdir)
        for step in (6, 8):
            shutil.rmtree(workdir / "checkpoints" / str(step))
        path = workdir / "checkpoints" / "4" / "meta" / "metadata"
        meta = json.loads(path.read_text())
        meta["prep"].update(prep)
        path.write_text(json.dumps(meta))
        return workdir, cli(setup, workdir, "--set", "data.pack_phrases=true")

    rows = 12  # 16 phrases of <= 8 tokens fill at most 8 rows of 16 (and at most 16 rows exist)
    workdir, proc = resume_from_4("floor", {"phrase_pack": {"rows": rows, "width": 16, "on": True}})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    meta = json.loads((workdir / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["prep"]["phrase_pack"]["rows"] == rows, meta
    workdir, proc = resume_from_4("badfloor", {"caption_len": -1})
    assert proc.returncode == 1
    assert "prep.caption_len" in proc.stdout + proc.stderr
    assert not (workdir / "checkpoints" / "6").exists()
