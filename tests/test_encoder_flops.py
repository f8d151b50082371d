"""encoder.flops (the numerator of MFU) against XLA's own count of the compiled programs, and
the MFU bench's smoke run. Compile only for the big presets (abstract params, nothing runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from clocmllm.encoder import flops as F
from clocmllm.encoder.config import load_model_config
from clocmllm.encoder.models.clip import CLIP

SMALL_VOCAB = {"vocab_size": 1000, "context_length": 32, "eot_token_id": 999, "pad_token_id": 0}


def xla_flops(fn, *abstract) -> float:
    cost = jax.jit(fn).lower(*abstract).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def abstract_model(preset: str):
    cfg = load_model_config(preset, SMALL_VOCAB)
    model = CLIP(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.dummy_inputs(1))["params"])
    return cfg, model, params


@pytest.mark.parametrize("preset,low,high", [("tiny", 1.0, 1.08), ("vit_s16", 1.0, 1.02), ("b16", 1.0, 1.02)])
@pytest.mark.parametrize("pooled", [True, False])
def test_vision_forward_flops_match_xla(preset, low, high, pooled):
    """Matmuls counted from the config = XLA's count of the tower, up to its elementwise work
    (GELU, softmax, LayerNorm: a few % at width 64, <1% at width 384+); `pooled`: the
    embedding alone (`encode_image`, last block at the class token), else all tokens."""
    cfg, model, params = abstract_model(preset)
    images = jax.ShapeDtypeStruct((4, cfg.image_size, cfg.image_size, 3), jnp.float32)

    def run(m, x):
        return m.encode_image(x) if pooled else m.pool_image(m.encode_image_tokens(x))

    got = xla_flops(lambda p, x: model.apply({"params": p}, x, method=run), params, images)
    assert low <= got / F.vision_forward_flops(cfg, 4, pooled=pooled) <= high


def test_text_and_prompter_forward_flops_match_xla():
    """Text (last block at the EOT row, counted so) and prompter + grounding head: the same
    matmuls as XLA counts."""
    cfg, model, params = abstract_model("vit_s16")
    ids = jax.ShapeDtypeStruct((8, cfg.context_length), jnp.int32)
    got = xla_flops(lambda p, t: model.apply({"params": p}, t, method="encode_text"), params, ids)
    assert 1.0 <= got / F.text_forward_flops(cfg, 8) <= 1.02

    b, m, s = 4, 3, cfg.num_image_tokens
    tokens = jax.ShapeDtypeStruct((b, s, cfg.vision_width), jnp.float32)
    boxes = jax.ShapeDtypeStruct((b, m, 4), jnp.float32)
    text_emb = jax.ShapeDtypeStruct((b, m, cfg.embed_dim), jnp.float32)

    def prompter(p, tok, bx, te):
        def run(mdl, tok, bx, te):
            (emb, _), (_, feat) = mdl.region_and_text_prompt_embed(tok, bx, te)
            return emb, mdl.ground(feat)

        return model.apply({"params": p}, tok, bx, te, method=run)

    got = xla_flops(prompter, params, tokens, boxes, text_emb)
    assert 0.98 <= got / F.prompter_forward_flops(cfg, b, m) <= 1.05


@pytest.mark.parametrize("first", [True, False])
def test_packed_text_forward_flops_match_xla(first):
    """The packed phrase pass (`TextTower.encode_packed`): rows of W tokens attending within
    their row (+ the shared first row), the last block at the pooled phrases only."""
    cfg, model, params = abstract_model("vit_s16")
    rows, width, pooled = 40, 16, 128
    ids = jax.ShapeDtypeStruct((rows, width), jnp.int32)
    pool = jax.ShapeDtypeStruct((pooled,), jnp.int32)
    sot = jax.ShapeDtypeStruct((rows,), jnp.int32) if first else None

    def run(p, t, pos, seg, pl, s):
        return model.apply({"params": p}, t, pos, seg, pl, s, method="encode_text_packed")

    got = xla_flops(run, params, ids, ids, ids, pool, sot)
    assert 1.0 <= got / F.packed_text_forward_flops(cfg, rows, width, pooled, first) <= 1.02
    unpacked = F.text_forward_flops(cfg, pooled, 8)  # the same 128 phrases as 8-token rows
    assert F.packed_text_forward_flops(cfg, rows, width, pooled, first) < 0.8 * unpacked


def test_step_flops_of_known_sizes_and_peaks():
    cfg = load_model_config("b16")
    clip = F.train_step_flops(cfg, 256)
    # ViT-B/16 at 224 px: the ~17.6 "GFLOPs" usually quoted are multiply-adds, i.e. ~35 GFLOP
    assert 34.5e9 < F.vision_forward_flops(cfg, 1) < 35.5e9
    cloc = F.train_step_flops(cfg, 256, regions=4, phrases=1024, phrase_tokens=16)
    assert 1.05 < cloc / clip < 1.3
    # the CLIP step's last vision block at the class token saves ~7% of the tower (x3 for the step)
    tokens = F.train_step_flops(cfg, 256, image_tokens=True)
    assert tokens - clip == 3 * (
        F.vision_forward_flops(cfg, 256) - F.vision_forward_flops(cfg, 256, pooled=True)
    )
    assert 0.06 < 1 - F.vision_forward_flops(cfg, 1, pooled=True) / F.vision_forward_flops(cfg, 1) < 0.08
    assert F.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and F.peak_flops("cpu") is None


def test_mfu_bench_smoke_run(tmp_path):
    """The GPU measurement's script runs end to end (tiny, CPU, a given peak) and its MFU is
    model FLOPs / step time / peak."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    import bench_mfu

    res = bench_mfu.main(
        ["--preset", "tiny", "--batch", "4", "--steps", "1", "--dtype", "float32", "--peak-tflops", "0.5",
         "--mode", "cloc", "--json", str(tmp_path / "mfu.json")]
    )  # fmt: skip
    assert (tmp_path / "mfu.json").is_file() and jnp.isfinite(res["loss"])
    assert res["mfu"] == pytest.approx(res["model_tflop"] / res["step_s"] / 0.5)
    assert res["xla_tflops_per_s"] > 0
    # the step timed is a run's: the trainer's batch preparation ran (at tiny its captions,
    # EOT at up to position 14 of 16, keep their length; the phrases, <= 8 real tokens
    # padded to 16, are cut to 8; no repeats to de-duplicate, no packing below width 256)
    assert res["batch_prep"] == "captions 16 -> 16 tokens; 16 distinct phrases, 16 -> 8 tokens"


def test_prompter_bench_runs_the_form_it_names():
    """scripts/bench/bench_prompter.py times the form it forces (XLA counts fewer FLOPs in the
    absorbed program, as `prompter_forward_flops` does) and leaves the model's rule as it
    found it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    import bench_prompter

    from clocmllm.encoder.models import transformer

    rule = transformer.absorb_prefix
    (*_, absorbed), (*_, plain) = (bench_prompter.run("tiny", 1, form, 1) for form in (True, False))
    cfg = load_model_config("tiny")
    want = F.prompter_forward_flops(cfg, 64, 4, absorbed=True) / F.prompter_forward_flops(
        cfg, 64, 4, absorbed=False
    )
    assert absorbed / plain == pytest.approx(want, rel=0.1)
    assert transformer.absorb_prefix is rule


def test_trace_summary_counts_device_streams_once(tmp_path, capsys):
    """The profile table (scripts/bench/trace_summary.py) sums the CUDA stream's kernels by
    class and leaves out the device's derived lines ("XLA Ops") that repeat them."""
    import gzip
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    import trace_summary

    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #14(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
    ]
    kernels = [("nvjet_sm90_tst_128x160_NNT", 0, 600), ("cudnn_generated_sdpa_flash_fprop", 600, 200),
               ("input_reduce_fusion_3", 800, 100), ("loop_multiply_fusion_2", 950, 50)]  # fmt: skip
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": d, "name": n} for n, ts, d in kernels]
    events += [{"ph": "X", "pid": 1, "tid": 8, "ts": 0, "dur": 950, "name": "fusion.1"},  # derived line
               {"ph": "X", "pid": 2, "tid": 3, "ts": 0, "dur": 5000, "name": "python"}]  # fmt: skip
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    res = trace_summary.main([str(tmp_path), "--steps", "1"])
    assert res["busy_ms"] == pytest.approx(0.95) and res["span_ms"] == pytest.approx(1.0)
    assert res["classes"] == pytest.approx(
        {
            "GEMM (cuBLAS / CUTLASS)": 0.6,
            "attention (cuDNN / flash)": 0.2,
            "reduction fusion": 0.1,
            "elementwise / loop fusion": 0.05,
        }  # fmt: skip
    )
    assert "Stream #14" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="perfetto_trace"):
        trace_summary.main([str(tmp_path / "plugins" / "missing")])
