"""CLOC prompter, forward + backward, in its two forms side by side: absorbed vs plain.

Command:  .venv/bin/python scripts/bench/bench_prompter.py [--presets tiny vit_s16] [--heads 1 4]
Expected: ~1 min for tiny, ~2 min with vit_s16, one pinned thread. Prints, per preset and
prompter head count, the median and best time of `region_and_text_prompt_embed` (M = 4 box
and text prompts an image, as the CLOC step calls it) with gradients into the params and
the image tokens, for the plain form (the image tokens projected to keys and values once an
image) and the absorbed form (`encoder.flops.absorb_prefix`: queries folded through Wk, the
attention-weighted tokens through Wv), the speed-up, which form the model picks, and the
FLOPs of each: model FLOPs (`encoder.flops.prompter_forward_flops` x 3) and XLA's count of
the compiled program (which shows the forced form is the one that ran). Both forms compute the same
function (tests/test_encoder_models.py). Session 8, two runs: tiny 1.11-1.22x at 1 head,
0.97-0.98x at 4; ViT-S/16 1.48-1.50x at 1 head, 1.36-1.37x at 4 (docs/benchmarks.md, "where
the CPU time goes", item 9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

BATCH = {"tiny": 64, "vit_s16": 32, "b16": 8}


def run(preset: str, heads: int, absorbed: bool, reps: int) -> tuple[float, float, float]:
    """(median, best) process CPU seconds of the prompter's fwd+bwd in the given form, and
    XLA's FLOP count of that compiled program."""
    from clocmllm.encoder.models import transformer

    rule = transformer.absorb_prefix
    transformer.absorb_prefix = lambda *a: absorbed  # force the form while tracing
    try:
        return _time_prompter(preset, heads, reps)
    finally:
        transformer.absorb_prefix = rule


def _time_prompter(preset: str, heads: int, reps: int) -> tuple[float, float, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.models.clip import CLIP, init_params

    cfg = load_model_config(preset, {"prompter_heads": heads})
    model, params = CLIP(cfg), init_params(cfg)
    b, m = BATCH[preset], 4
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.standard_normal((b, cfg.num_image_tokens, cfg.vision_width)), jnp.float32)
    xy, wh = rng.uniform(0, 0.5, (b, m, 2)), rng.uniform(0.1, 0.5, (b, m, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + wh], -1), jnp.float32)
    text = jnp.asarray(rng.standard_normal((b, m, cfg.embed_dim)), jnp.float32)

    def loss(p, tok):
        (be, bf), (te, tf) = model.apply(
            {"params": p}, tok, boxes, text, method="region_and_text_prompt_embed"
        )
        return (be**2).sum() + (bf**2).sum() + (te**2).sum() + (tf**2).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, tokens).compile()
    cost = step.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    jax.block_until_ready(step(params, tokens))
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        jax.block_until_ready(step(params, tokens))
        times.append(time.process_time() - t0)
    return statistics.median(times), min(times), xla_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "vit_s16"])
    ap.add_argument("--heads", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT", *run(args.one[0], int(args.one[1]), args.one[2] == "absorbed", args.reps))
        return
    import subprocess
    import sys

    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.flops import absorb_prefix, prompter_forward_flops

    # each form in its own single-threaded process (XLA reads its flags at start-up)
    flags = " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + flags}
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print(
        f"one thread, load {os.getloadavg()[0]:.1f}; ms = process CPU time of fwd+bwd, median (best) of {args.reps}"
    )
    print(
        f"{'preset':8s} {'heads':>5s} {'plain ms':>16s} {'absorbed ms':>16s} {'speed-up':>8s} {'picks':>9s}"
        f" {'model GFLOP p / a':>18s} {'XLA GFLOP p / a':>16s}"
    )
    for preset in args.presets:
        for heads in args.heads:
            cfg = load_model_config(preset, {"prompter_heads": heads})
            res, model = {}, {}
            for form in ("plain", "absorbed"):
                cmd = [sys.executable, __file__, "--one", preset, str(heads), form, "--reps", str(args.reps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                res[form] = [float(v) for v in out[out.index("RESULT") + 7 :].split()[:3]]
                model[form] = 3 * prompter_forward_flops(cfg, BATCH[preset], 4, absorbed=form == "absorbed")
            picks = (
                "absorbed" if absorb_prefix(cfg.num_image_tokens, cfg.vision_width, heads, 12) else "plain"
            )
            ms = {k: f"{1000 * v[0]:7.1f} ({1000 * v[1]:6.1f})" for k, v in res.items()}
            print(
                f"{preset:8s} {heads:5d} {ms['plain']:>16s} {ms['absorbed']:>16s}"
                f" {res['plain'][0] / res['absorbed'][0]:7.2f}x {picks:>9s}"
                f" {model['plain'] / 1e9:8.2f} / {model['absorbed'] / 1e9:.2f}"
                f" {res['plain'][2] / 1e9:7.2f} / {res['absorbed'][2] / 1e9:.2f}"
            )


if __name__ == "__main__":
    main()
