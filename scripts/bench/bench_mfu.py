"""Training-step MFU (model FLOPs utilisation) of our JAX CLIP / CLOC step on one device.

Command (GPU machine):
    .venv/bin/python scripts/bench/bench_mfu.py --preset b16 --batch 256 --dtype bfloat16 --steps 20
Expected: ~2 min on one H100 (compile ~1 min); prints step time, images/s, model TFLOP/s,
XLA-counted TFLOP/s and MFU = model FLOP/s / the chip's dense bf16 peak (`encoder/flops.py`
table, or `--peak-tflops`). The issue's target for B/16 in bf16 is MFU >= 40%. Not yet
measured: no session of this project has had a GPU (docs/benchmarks.md).
On a CPU there is no peak in the table: pass `--peak-tflops`, e.g. the smoke run the tests use,
`--preset tiny --batch 8 --steps 2 --peak-tflops 0.1`.

Model FLOPs are counted from the config (`encoder.flops.train_step_flops`: matmuls, backward =
2x forward), so recomputation (`--set remat`) is not credited; XLA's own count of the
compiled program is printed beside it. Compute dtype `--dtype` (parameters stay float32);
the step is the trainer's (`trainer.make_train_step`), state donated, compile excluded.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def fake_batch(mc, batch: int, mode: str, regions: int = 4, phrase_tokens: int = 8) -> dict:
    """Random images, captions of the preset's context length ending in EOT at a random
    position, and for CLOC `regions` boxes and phrases an image (all valid)."""
    rng = np.random.default_rng(0)
    t = mc.context_length
    text = rng.integers(1, mc.vocab_size - 1, (batch, t)).astype(np.int32)
    text[np.arange(batch), rng.integers(4, t, batch)] = mc.eot_token_id
    out = {
        "images": rng.normal(size=(batch, mc.image_size, mc.image_size, 3)).astype(np.float32),
        "text": text,
    }
    if mode == "cloc":
        x1 = rng.random((batch, regions, 2)).astype(np.float32) * 0.5
        phrases = rng.integers(1, mc.vocab_size - 1, (batch, regions, phrase_tokens)).astype(np.int32)
        phrases[..., -1] = mc.eot_token_id
        out.update(
            region_boxes=np.concatenate([x1, x1 + 0.4], -1),
            region_valid=np.ones((batch, regions), bool),
            region_text=phrases,
        )
    return out


def measure(preset: str, batch: int, mode: str, dtype: str, steps: int, peak_tflops: float | None) -> dict:
    import jax
    from bench_train_step import timed_steps  # the same step as the CPU bench and the trainer

    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.flops import batch_step_flops, peak_flops

    mc = load_model_config(preset, {"dtype": dtype})
    host = fake_batch(mc, batch, mode)
    res = timed_steps(mc, mode, host, steps)
    step_s = res["step_s"]
    flops = batch_step_flops(mc, host)
    cost = res["compiled"].cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    device = jax.devices()[0]
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device.device_kind)
    return {
        "preset": preset,
        "mode": mode,
        "dtype": dtype,
        "batch": batch,
        "device": device.device_kind,
        "compile_s": round(res["compile_s"], 2),
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "model_tflop": flops / 1e12,
        "model_tflops_per_s": flops / step_s / 1e12,
        "xla_tflops_per_s": float(cost.get("flops", 0.0)) / step_s / 1e12 if cost else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": flops / step_s / peak if peak else None,
        "loss": float(res["metrics"]["loss"]),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="b16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--mode", choices=("clip", "cloc"), default="clip")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak (default: table)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    res = measure(args.preset, args.batch, args.mode, args.dtype, args.steps, args.peak_tflops)
    mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a (unknown peak: --peak-tflops)"
    print(
        f"{res['preset']} {res['mode']} {res['dtype']} batch {res['batch']} on {res['device']}: "
        f"step {1000 * res['step_s']:.1f} ms, {res['images_per_s']:.1f} img/s, compile {res['compile_s']:.1f} s\n"
        f"  model {res['model_tflops_per_s']:.3f} TFLOP/s ({res['model_tflop']:.3f} TFLOP a step), "
        f"XLA-counted {res['xla_tflops_per_s'] or float('nan'):.3f} TFLOP/s; MFU {mfu}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
