"""Full training step: our JAX CLIP/CLOC step vs Hugging Face `CLIPModel` (PyTorch eager, AdamW).

Command:  .venv/bin/python scripts/bench/bench_train_step.py [--presets tiny vit_s16] [--steps 5]
Expected: ~3 min for tiny, ~6-10 min with vit_s16 on 2 idle cores (much longer when the
box is loaded). Prints, per preset, the median step time of each variant, its speed relative
to PyTorch (>1 = faster than PyTorch), the CLOC step's overhead over our CLIP step (M=4),
first-compile time and peak RSS. Each variant runs in its own subprocess (so peak memory is
its own), the variants of a preset one after the other; `--rounds 2` repeats the sequence
and keeps each variant's best median, which evens out load drift.

Step = forward of both towers + loss + backward + global-norm clipping + AdamW update, the
same work on both sides (CLIP softmax loss; HF `return_loss=True`). The CLOC step adds the
region-text, prompter and grounding terms over M=4 regions an image.
This script imports both torch and jax (only in its subprocesses); it is a bench, not library code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

BATCH = {"tiny": 64, "vit_s16": 32}
VOCAB, CONTEXT = 1000, 32  # a small vocabulary keeps the embedding table out of the comparison
REGION_CONTEXT = 16  # the trainer's default data.region_context_length


def model_config(preset: str, attention_impl: str = "einsum"):
    from clocmllm.encoder.config import load_model_config

    return load_model_config(
        preset,
        {
            "vocab_size": VOCAB,
            "context_length": CONTEXT,
            "eot_token_id": VOCAB - 1,
            "pad_token_id": 0,
            "attention_impl": attention_impl,
        },
    )


def fake_batch(mc, batch: int, m: int = 4) -> dict:
    rng = np.random.default_rng(0)
    text = rng.integers(1, VOCAB - 1, (batch, CONTEXT)).astype(np.int32)
    text[:, 20] = VOCAB - 1
    rtext = rng.integers(1, VOCAB - 1, (batch, m, REGION_CONTEXT)).astype(np.int32)
    rtext[..., 6] = VOCAB - 1
    x1 = rng.random((batch, m, 2)).astype(np.float32) * 0.5
    return {
        "images": rng.normal(size=(batch, mc.image_size, mc.image_size, 3)).astype(np.float32),
        "text": text,
        "region_boxes": np.concatenate([x1, x1 + 0.4], -1),
        "region_valid": np.ones((batch, m), bool),
        "region_text": rtext,
    }


def run_jax(preset: str, mode: str, steps: int, impl: str) -> dict:
    import jax
    from clocmllm.encoder.models.clip import CLIP
    from clocmllm.encoder.optimizer import build_optimizer
    from clocmllm.encoder.trainer import DEFAULTS, abstract_state, deep_merge, make_train_step

    mc = model_config(preset, impl)
    model = CLIP(mc)
    cfg = deep_merge(DEFAULTS, {"mode": mode})
    tx, sched = build_optimizer(cfg["optim"], 1000)
    _, init = abstract_state(model, tx, 0)
    state = jax.jit(init)()
    batch = {k: jax.numpy.asarray(v) for k, v in fake_batch(mc, BATCH[preset]).items()}
    if mode == "clip":
        batch = {k: batch[k] for k in ("images", "text")}
    step = jax.jit(make_train_step(model, tx, sched, cfg), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "step_s": statistics.median(times[1:]), "loss": float(metrics["loss"])}


def run_torch(preset: str, steps: int) -> dict:
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    mc = model_config(preset)
    common = {"hidden_act": mc.hidden_act, "layer_norm_eps": mc.layer_norm_eps, "attention_dropout": 0.0}
    cfg = CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": mc.text_width, "intermediate_size": mc.text_mlp_dim,
                     "num_hidden_layers": mc.text_layers, "num_attention_heads": mc.text_heads,
                     "max_position_embeddings": CONTEXT, "eos_token_id": VOCAB - 1, "pad_token_id": 0,
                     "bos_token_id": 1, **common},
        vision_config={"hidden_size": mc.vision_width, "intermediate_size": mc.vision_mlp_dim,
                       "num_hidden_layers": mc.vision_layers, "num_attention_heads": mc.vision_heads,
                       "image_size": mc.image_size, "patch_size": mc.patch_size, **common},
        projection_dim=mc.embed_dim,
    )  # fmt: skip
    model = CLIPModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    b = fake_batch(mc, BATCH[preset])
    pixels = torch.from_numpy(b["images"]).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(b["text"]).long()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": times[0] - statistics.median(times[1:]),
        "step_s": statistics.median(times[1:]),
        "loss": float(out.loss),
    }


def one(kind: str, preset: str, steps: int) -> None:
    if kind == "torch":
        res = run_torch(preset, steps)
    else:
        _, mode, impl = kind.split(":")
        res = run_jax(preset, mode, steps, impl)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT" + json.dumps(res))


VARIANTS = ("torch", "jax:clip:einsum", "jax:clip:dot_product", "jax:cloc:einsum")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "vit_s16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads per side (0: all cores); 1 = torch.set_num_threads(1) and single-threaded XLA, "
        "the fair setting on a loaded box where spinning thread pools fight for cores",
    )
    ap.add_argument("--one", nargs=2, metavar=("KIND", "PRESET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], args.one[1], args.steps)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["BENCH_THREADS"] = str(args.threads)
        if args.threads == 1:
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "")
                + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            ).strip()
    print(
        f"cores={os.cpu_count()} threads={args.threads or 'all'} load={os.getloadavg()[0]:.1f} steps={args.steps} rounds={args.rounds}"
    )
    for preset in args.presets:
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for kind in args.variants:
                cmd = [sys.executable, __file__, "--one", kind, preset, "--steps", str(args.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"{preset} {kind} FAILED:\n{proc.stderr[-2000:]}")
                    continue
                res = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6 :].splitlines()[0])
                if kind not in best or res["step_s"] < best[kind]["step_s"]:
                    best[kind] = res
        torch_s = best.get("torch", {}).get("step_s")
        print(f"\n{preset}: batch {BATCH[preset]}, load {os.getloadavg()[0]:.1f}")
        print(f"  {'variant':22s} {'step ms':>9s} {'vs torch':>9s} {'compile s':>10s} {'peak MB':>8s}")
        for kind, res in best.items():
            ratio = f"{torch_s / res['step_s']:.2f}x" if torch_s else "-"
            print(
                f"  {kind:22s} {1000 * res['step_s']:9.1f} {ratio:>9s} {res['compile_s']:10.1f} {res['peak_rss_mb']:8.0f}"
            )
        if "jax:clip:einsum" in best and "jax:cloc:einsum" in best:
            over = best["jax:cloc:einsum"]["step_s"] / best["jax:clip:einsum"]["step_s"] - 1
            print(f"  CLOC step overhead over our CLIP step (M=4): {100 * over:+.1f}%")


if __name__ == "__main__":
    main()
