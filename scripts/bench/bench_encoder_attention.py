"""Encoder attention layouts: CLIP gradient step of our Flax model vs HF PyTorch CLIPModel, CPU.

Command:  .venv/bin/python scripts/bench/bench_encoder_attention.py [--repeats 7] [--threads 1]
Expected: ~2-4 minutes on 2 idle cores. Prints the median step time of each JAX
`attention_impl` and of PyTorch, and each one's speed relative to PyTorch (>1 = faster),
measured side by side in the same process, runs interleaved so load drifts hit all alike.

The step is the same on both sides: both towers forward, CLIP softmax loss, gradients of
every parameter (no optimizer update, which is not the attention's business). JAX runs
jit-compiled (compile excluded), PyTorch eager with as many threads as XLA uses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

SIZES = dict(
    image_size=128, patch_size=16, vision_width=256, vision_layers=4, vision_heads=4,
    vision_mlp_dim=1024, text_width=256, text_layers=4, text_heads=4, text_mlp_dim=1024,
    vocab_size=1000, context_length=32, embed_dim=256, hidden_act="quick_gelu",
    eot_token_id=999, pad_token_id=0,
)  # fmt: skip


def jax_steps(batch: int, impls: list[str]):
    import jax
    import jax.numpy as jnp

    from clocmllm.encoder.config import ModelConfig
    from clocmllm.encoder.losses import clip_softmax_loss
    from clocmllm.encoder.models.clip import CLIP, init_params

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, 128, 128, 3)), jnp.float32)
    ids = rng.integers(1, 999, size=(batch, 32)).astype(np.int32)
    ids[:, 20] = 999
    ids = jnp.asarray(ids)
    params = init_params(ModelConfig(**SIZES), 0)
    steps = {}
    for impl in impls:
        model = CLIP(ModelConfig(**SIZES, attention_impl=impl))

        def loss_fn(p, model=model):
            out = model.apply({"params": p}, images, ids)
            return clip_softmax_loss(out["image_emb"], out["text_emb"], p["logit_scale"])

        grad = jax.jit(jax.value_and_grad(loss_fn))
        jax.block_until_ready(grad(params))  # compile

        def run(grad=grad):
            jax.block_until_ready(grad(params))

        steps[f"jax[{impl}]"] = run
    return steps


def torch_step(batch: int):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision_config=dict(
            hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
            image_size=128, patch_size=16, hidden_act="quick_gelu",
        ),
        text_config=dict(
            hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
            vocab_size=1000, max_position_embeddings=32, eos_token_id=999, bos_token_id=998,
        ),
        projection_dim=256,
    )  # fmt: skip
    model = CLIPModel(cfg)
    pixels = torch.randn(batch, 3, 128, 128)
    ids = torch.randint(1, 999, (batch, 32))
    ids[:, 20] = 999

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        out.loss.backward()

    run()  # warm-up
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--impls", default="einsum,einsum_bthd,dot_product")
    parser.add_argument("--threads", type=int, default=0, help="1 = single-threaded both sides")
    args = parser.parse_args()
    if args.threads == 1:  # must be set before jax initialises its CPU client
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            " intra_op_parallelism_threads=1"
        )

    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    steps = jax_steps(args.batch, args.impls.split(","))
    steps["torch[HF CLIPModel]"] = torch_step(args.batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, run in steps.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch[HF CLIPModel]"])
    print(f"CLIP grad step, batch {args.batch}, {threads} CPU threads, {args.repeats} repeats")
    print(f"{'implementation':<24}{'median s':>10}{'speed vs torch':>16}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<24}{med:>10.4f}{ref / med:>15.2f}x")


if __name__ == "__main__":
    main()
