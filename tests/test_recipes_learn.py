"""Every pretraining recipe learns on the synthetic world, through the real `clocmllm pretrain`.

Issue #8: "a tiny run of each recipe on the synthetic world learns: its loss falls and its
retrieval beats chance". One module-scoped world (512 train / 64 held-out eval images, 32 px)
is shared by one run per recipe (a subprocess of the real CLI, micro model, fixed seed,
150-200 steps: the XLA compiles cost more than the steps). The retrieval figure is the
trainer's own end-of-run evaluation on the held-out split (`eval/image_text_r5` in
metrics.jsonl, the same `evaluate_records` as `clocmllm eval encoder`), and the bar is twice
the chance level of that eval set, computed here from its captions.

What "retrieval" means per recipe: CLIP, CLOC and clip-rocket train the CLIP heads, so it is
image<->caption retrieval through them. LCL never trains the CLIP text tower; its figure is
LCL's own aligned pair, the pooled image latent z against the LM state at `<img>` after the
caption (encoder/evaluators/lcl.py), also checked through `clocmllm eval encoder` here.

Sizes were chosen so every run clears the bar with room (figures are printed; run with `-s`):
R@5 came out 3.1-8.4x chance across seeds 0 and 1 (docs/pretraining.md has the table).
Cost: ~120 CPU-s for the five runs, most of it XLA compiles (shared persistent cache).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from micro import jax_cli_env, micro_model

STEPS = 150
# Per recipe: config over BASE, and its steps.
# LCL: lam 1.0, not LCL's 0.1. Its z/h pair only starts to align once the LM reads captions;
# measured here (R@5, chance 0.078): lam 0.1 -> 0.148 at 150 steps, 0.625 / 0.227 at 300
# steps (seeds 0 / 1); lam 1.0 -> 0.625 / 0.523 at 200 steps. The objective is the same.
LCL_SECTION = {
    "lam": 1.0,
    "seq_len": 64,  # 17 image tokens + 2 boundaries + captions (<= 40 tokens)
    "lm": {"width": 32, "layers": 1, "heads": 2, "mlp_dim": 64, "max_len": 64, "pooler_heads": 2},
}
RUNS: dict[str, tuple[dict, int]] = {
    "clip": ({"mode": "clip"}, STEPS),
    "cloc": ({"mode": "cloc"}, STEPS),
    "rocket": (
        {"mode": "clip", "recipe": "rocket", "rocket": {"num_views": 1, "region_on_strong": False}},
        STEPS,
    ),
    "rocket+cloc": ({"mode": "cloc", "recipe": "rocket", "rocket": {"num_views": 1}}, STEPS),
    "lcl": ({"mode": "clip", "recipe": "lcl", "lcl": LCL_SECTION}, 200),
}
BASE = {
    "seed": 0,
    "progress": False,
    # captions of the world run up to ~35 tokens: context 40 keeps them whole
    "model": {"preset": "tiny", **micro_model(context_length=40)},
    "data": {"batch_size": 32, "num_regions": 2, "threads": 1},
    "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.1},
    "checkpoint": {"every": 100000, "keep": 1},
    "log_every": 1,
    "eval": {"max_images": 64, "batch_size": 64, "at_end": True},
}
EVAL_IMAGES = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from clocmllm.data.world import generate_world

    root = tmp_path_factory.mktemp("learn")
    generate_world(root / "world", train=512, eval=EVAL_IMAGES, seed=0, image_size=32, progress=False)
    env = jax_cli_env()
    return root, env


def pretrain(world, name: str) -> tuple[Path, list[dict]]:
    root, env = world
    over, steps = RUNS[name]
    recipe = root / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({**BASE, **over, "steps": steps}))
    workdir = root / name
    cmd = [sys.executable, "-m", "clocmllm", "pretrain", "--config", str(recipe), "--workdir", str(workdir),
           "--data", str(root / "world")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return workdir, rows


def eval_chance(world) -> dict[int, float]:
    """Chance recall of the held-out split, from its captions (not from the evaluator)."""
    from clocmllm.encoder.input_pipeline import load_records

    captions = [r.caption for r in load_records(world[0] / "world", "eval")][:EVAL_IMAGES]
    n = len(captions)
    counts = {c: captions.count(c) for c in set(captions)}
    # a random ranking misses every same-caption key in the top k with prob C(n-c,k)/C(n,k)
    out = {}
    for k in (1, 5):
        miss = [np.prod([(n - counts[c] - i) / (n - i) for i in range(k)]) for c in captions]
        out[k] = float(1 - np.mean(miss))
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_recipe_learns_loss_falls_and_retrieval_beats_chance(world, name):
    workdir, rows = pretrain(world, name)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == RUNS[name][1] and np.all(np.isfinite(losses))
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-10:]))
    ev = [r for r in rows if "eval/image_text_r5" in r][-1]
    r1, r5 = ev["eval/image_text_r1"], ev["eval/image_text_r5"]
    chance = eval_chance(world)
    print(
        f"\n{name:12s} loss {first:.3f} -> {last:.3f}   image-text R@1 {r1:.3f} R@5 {r5:.3f}   "
        f"chance R@1 {chance[1]:.3f} R@5 {chance[5]:.3f}   ({ev['eval/num_images']:.0f} held-out images)"
    )
    assert ev["eval/num_images"] == EVAL_IMAGES
    # the evaluator's own chance level agrees with the one computed here
    assert ev["eval/image_text_chance_r5"] == pytest.approx(chance[5])
    assert last < 0.8 * first, f"{name}: loss did not fall ({first:.3f} -> {last:.3f})"
    assert r5 > 2 * chance[5], f"{name}: image-text R@5 {r5:.3f} is not above 2x chance {chance[5]:.3f}"
    if name == "lcl":
        check_lcl_checkpoint_eval(world, workdir, r1, r5)


def check_lcl_checkpoint_eval(world, workdir: Path, r1: float, r5: float) -> None:
    """`clocmllm eval encoder` on the LCL checkpoint reads `recipe: lcl` from its config and
    gives the trainer's figures; its text side h is causal (reads only the caption, cut to fit)."""
    from clocmllm.data.regions import RegionRecord
    from clocmllm.encoder.checkpoints import load_tokenizer, restore_params
    from clocmllm.encoder.config import ModelConfig
    from clocmllm.encoder.evaluators.lcl import lcl_embeddings
    from clocmllm.encoder.input_pipeline import load_records
    from clocmllm.encoder.models.clip import CLIP

    root, env = world
    out = workdir / "eval.json"
    cmd = [sys.executable, "-m", "clocmllm", "eval", "encoder", "--checkpoint", str(workdir), "--data",
           str(root / "world"), "--json", str(out), "--no-zero-shot", "--batch-size", "64"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["image_text_r5"] == pytest.approx(r5, abs=1e-6)
    assert got["image_text_r1"] == pytest.approx(r1, abs=1e-6)

    config, params, _ = restore_params(workdir)
    model = CLIP(ModelConfig.from_dict(config["model"]))
    tokenize = load_tokenizer(config, workdir).encode_batch
    recs = load_records(root / "world", "eval")[:3]
    swapped = [
        RegionRecord(image=recs[(i + 1) % 3].image_path, caption=r.caption) for i, r in enumerate(recs)
    ]
    # seq_len 26 leaves 26 - 17 - 2 = 7 caption tokens: the captions are cut, the images kept
    section = {**config["lcl"], "seq_len": 26}
    z, h = lcl_embeddings(model, params, recs, tokenize, section, batch_size=4)
    z2, h2 = lcl_embeddings(model, params, swapped, tokenize, section, batch_size=4)
    np.testing.assert_allclose(h2, h, atol=1e-5)  # same captions before other images: same h
    np.testing.assert_allclose(z2, np.roll(z, -1, axis=0), atol=1e-5)  # z follows its image
    assert not np.allclose(z[0], z[1], atol=1e-3)


def test_chance_recall_matches_a_random_ranking():
    from clocmllm.encoder.evaluators.retrieval import chance_recall_at_k, recall_at_k

    labels = ["a", "a", "a", "b", "c", "d", "e", "f"]  # a repeated caption raises chance
    chance = chance_recall_at_k(labels, labels, (1, 3))
    assert chance[1] == pytest.approx(np.mean([3 / 8] * 3 + [1 / 8] * 5))
    rng = np.random.default_rng(0)
    sims = [
        recall_at_k(rng.normal(size=(8, 16)), rng.normal(size=(8, 16)), labels, labels, (1, 3))
        for _ in range(3000)
    ]
    for k in (1, 3):
        assert np.mean([s[k] for s in sims]) == pytest.approx(chance[k], abs=0.01)


def test_demo_report_has_a_row_of_figures_for_each_recipe():
    """`clocmllm demo --recipes clip,cloc,rocket,lcl`: the report puts every recipe's encoder
    figures and export parity side by side (the unit under the demo's report.md table)."""
    from clocmllm.demo import PLANS, StageResult
    from clocmllm.demo_report import ENCODER_KEYS, build_report, table_markdown

    recipes = ("clip", "cloc", "rocket", "lcl")
    plan = dataclasses.replace(PLANS["quick"], recipes=recipes)
    results = {}
    for i, r in enumerate(recipes):
        metrics = {k: 0.1 * (i + 1) + 0.01 * j for j, k in enumerate(ENCODER_KEYS)}
        results[f"pretrain_{r}"] = StageResult(f"pretrain_{r}", "done", 1.0)
        results[f"export_{r}"] = StageResult(f"export_{r}", "done", 1.0, {"report": {"max_abs_diff": 1e-6}})
        results[f"eval_encoder_{r}"] = StageResult(f"eval_encoder_{r}", "done", 1.0, {"metrics": metrics})
    report = build_report(results, plan, 10.0)
    assert report["recipes"] == list(recipes)
    for i, r in enumerate(recipes):
        assert report["encoders"][r]["image_text_r1"] == pytest.approx(0.1 * (i + 1))
        assert report["export"][r]["max_abs_diff"] == 1e-6
    table = table_markdown(report)
    assert table.splitlines()[0] == "| metric | clip | cloc | rocket | lcl |"
    row = next(ln for ln in table.splitlines() if ln.startswith("| encoder image_text_r1 |"))
    assert row.split("|")[2:6] == [" 0.100 ", " 0.200 ", " 0.300 ", " 0.400 "]
