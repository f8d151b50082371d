"""Step-time cost of the clip-rocket and LCL losses over a plain CLIP loss, tiny model, CPU.

Command:  .venv/bin/python scripts/bench/bench_recipes.py [--batch 16] [--repeats 15] [--one-thread]
Expected: ~2-4 minutes on 2 idle cores (most of it XLA compiles). Prints the median time of
one gradient step (loss + grads of every parameter, jit-compiled, compile excluded) for each
objective and its ratio to plain CLIP measured side by side in the same process, runs
interleaved so load drifts hit all alike; then the numpy-side cost of making the views.
Each step is timed in wall time and in process CPU time; `--one-thread` runs XLA on one
thread (set before jax loads), so the CPU time is the step's compute and holds up on a box
loaded by other jobs, where wall time does not.

Objectives (tiny preset: 64 px, 8 px patches, width 64, 2+2 layers):
  clip          CLIP InfoNCE on the weak view (the baseline, ratio 1.00)
  cloc          the trainer's CLOC loss (M=4 regions): the peer recipes are usually added to
  rocket        clip + n=2 strong views/EDA captions through the rocket projector
  rocket+cloc   cloc on the weak view + rocket views with region terms on the strong views
  lcl           LCL: vision tower + causal LM (width 128, 2 layers, seq 128) + pooler
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--one-thread", action="store_true", help="XLA on one thread (CPU time = compute)")
    args = ap.parse_args()
    if args.one_thread:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
    print(f"cores={os.cpu_count()} one_thread={args.one_thread} load={os.getloadavg()[0]:.1f}")

    import jax

    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.models.clip import CLIP, init_params
    from clocmllm.encoder.recipes import lcl, rocket
    from clocmllm.encoder.trainer import DEFAULTS, make_loss_fn

    mc = load_model_config("tiny")
    model = CLIP(mc)
    b, n, m, t, s = args.batch, 2, 4, mc.context_length, mc.image_size
    r = np.random.default_rng(0)

    def ids(shape):
        x = r.integers(4, mc.vocab_size, shape).astype(np.int32)
        x[..., -1] = mc.eot_token_id
        return x

    boxes = np.sort(r.random((b, n + 1, m, 2, 2)), axis=-2).reshape(b, n + 1, m, 4).astype(np.float32)
    weak = {
        "images": r.normal(size=(b, s, s, 3)).astype(np.float32),
        "text": ids((b, t)),
        "region_text": ids((b, m, t)),
        "region_boxes": boxes[:, 0],
        "region_valid": np.ones((b, m), bool),
    }
    aug = {
        "aug_images": r.normal(size=(b, n, s, s, 3)).astype(np.float32),
        "aug_text": ids((b, n, t)),
        "aug_region_boxes": boxes[:, 1:],
        "aug_region_valid": np.ones((b, n, m), bool),
    }
    params = init_params(mc, 0)
    rk_cfg = rocket.Config(num_views=n, region_on_strong=False)
    rk_reg = rocket.Config(num_views=n, region_on_strong=True)
    lcl_cfg = lcl.Config.from_dict(
        {
            "seq_len": 128,
            "max_images": b,
            "lm": {"width": 128, "layers": 2, "heads": 4, "mlp_dim": 512, "max_len": 128},
        }
    )
    rk_params = {**params, "rocket": rocket.init_extra_params(jax.random.key(1), mc, rk_cfg)}
    lcl_params = {**params, "lcl": lcl.init_extra_params(jax.random.key(2), mc, lcl_cfg)}
    docs = []
    for i in range(b):
        img = ("image", r.normal(size=(s, s, 3)).astype(np.float32))
        txt = ("text", [int(x) for x in ids(t)])
        docs.append([img, txt] if i % 2 else [txt, img])
    lcl_batch = lcl.build_lcl_batch(docs, 128, mc.num_image_tokens, b, lcl.special_ids(mc), (s, s, 3))

    clip_fn = rocket.clip_loss_fn(model)
    cloc_fn = make_loss_fn(model, {**DEFAULTS, "mode": "cloc"})
    runs = {
        "clip": (clip_fn, params, weak),
        "cloc": (cloc_fn, params, weak),
        "rocket": (rocket.make_loss_fn(model, rk_cfg, clip_fn), rk_params, {**weak, **aug}),
        "rocket+cloc": (rocket.make_loss_fn(model, rk_reg, cloc_fn), rk_params, {**weak, **aug}),
        "lcl": (lcl.make_loss_fn(model, lcl_cfg), lcl_params, lcl_batch),
    }
    steps = {}
    for name, (fn, p, batch) in runs.items():
        g = jax.jit(jax.grad(lambda p, bt, fn=fn: fn(p, bt)[0]))
        t0 = time.perf_counter()
        jax.block_until_ready(g(p, batch))
        print(f"compiled {name:12s} {time.perf_counter() - t0:6.1f} s", flush=True)
        steps[name] = (g, p, batch)
    times = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, (g, p, batch) in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(g(p, batch))
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    base, cbase = statistics.median(times["clip"]), statistics.median(cpu["clip"])
    print(
        f"\n1. gradient step, tiny preset, batch {b}, n={n} strong views, M={m} regions, median of {args.repeats}"
    )
    print(f"{'objective':12s} {'ms/step':>9s} {'vs clip':>8s} {'cpu ms':>9s} {'vs clip':>8s}")
    for name, ts in times.items():
        med, cmed = statistics.median(ts), statistics.median(cpu[name])
        print(f"{name:12s} {1e3 * med:9.1f} {med / base:7.2f}x {1e3 * cmed:9.1f} {cmed / cbase:7.2f}x")

    # numpy side: making the views of one batch (the input pipeline's extra work)
    from PIL import Image

    from clocmllm.encoder.augment import strong_view, weak_view
    from clocmllm.encoder.caption_augment import CaptionAugment

    photo = Image.fromarray((r.random((96, 128, 3)) * 255).astype(np.uint8))
    pix_boxes = np.asarray([[10, 10, 60, 50], [40, 30, 120, 90]], np.float64)
    cap, caption = (
        CaptionAugment(use_wordnet=False),
        "a small red circle and a large blue square on a dark gray background",
    )
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        weak_view(photo, pix_boxes, s)
    t_weak = (time.perf_counter() - t0) / reps
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(reps):
        strong_view(photo, pix_boxes, s, rng)
        cap(caption, rng)
    t_strong = (time.perf_counter() - t0) / reps
    print(f"\n2. views of one 128x96 image at {s} px (numpy/PIL, one thread)")
    print(
        f"weak (letterbox) {1e3 * t_weak:.2f} ms   strong view + EDA caption {1e3 * t_strong:.2f} ms   ratio {t_strong / t_weak:.2f}x"
    )


if __name__ == "__main__":
    main()
