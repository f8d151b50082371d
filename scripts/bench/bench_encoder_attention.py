"""Encoder attention layouts: CLIP gradient step of our Flax model vs HF PyTorch CLIPModel, CPU.

Command:  .venv/bin/python scripts/bench/bench_encoder_attention.py [--repeats 7] [--threads 1]
Expected: ~2-3 minutes on 2 idle cores. Prints (1) the median step time of each JAX
`attention_impl` and of PyTorch, and each one's speed relative to PyTorch (>1 = faster),
measured side by side in the same process, runs interleaved so load drifts hit all alike;
(2) the same for the parts of one ViT layer (MLP, attention, block) and for the q/k/v
layout we started with. Result (1 thread, docs/benchmarks.md): jax[einsum] 0.75-0.79x of
PyTorch for the whole step; attention 0.95-1.0x at this size (the first layout ~0.6x), 0.68x
at B/16 size (`--layer-only --layer 8,197,768,12,3072`, ~30 s) where PyTorch's fused SDPA
wins; XLA's GEMMs (~15% slower than oneDNN's) are the rest of the gap.

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


def layer_parts(
    clock, repeats: int, b: int = 32, t: int = 65, d: int = 256, h: int = 4, f: int = 1024
) -> list[tuple[str, float, float]]:
    """Gradient of one ViT layer's parts ([B, T, D], H heads, MLP F), JAX vs HF PyTorch.

    Also times the q/k/v layout we used first (index a [3, B, H, T, Dh] transpose) so the
    gain of the split-then-transpose layout is measured side by side.
    """
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention, CLIPEncoderLayer

    from clocmllm.encoder.models.transformer import MLP, Attention, Block

    x = np.random.default_rng(0).normal(size=(b, t, d)).astype(np.float32)
    jx, tx = jnp.asarray(x), torch.tensor(x, requires_grad=True)
    cfg = CLIPVisionConfig(hidden_size=d, intermediate_size=f, num_attention_heads=h, hidden_act="quick_gelu")
    cfg._attn_implementation = "sdpa"  # what CLIPModel picks by default on CPU

    def first_layout(p, x):  # the layout replaced in encoder/models/transformer.py
        w, bias = p["params"]["qkv"]["kernel"], p["params"]["qkv"]["bias"]
        qkv = jnp.moveaxis((x @ w + bias).reshape(b, t, 3, h, d // h), (2, 3), (0, 2))
        q, k, v = qkv[0] * (d // h) ** -0.5, qkv[1], qkv[2]
        a = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
        y = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", a, v), 1, 2).reshape(b, t, d)
        o = p["params"]["out"]
        return y @ o["kernel"] + o["bias"]

    attn = Attention(d, h, 4)
    parts = [
        ("mlp", MLP(d, f, "quick_gelu", 4).apply, MLP(d, f, "quick_gelu", 4), CLIPMLP(cfg)),
        ("attention", attn.apply, attn, CLIPAttention(cfg)),
        ("attention, first layout", first_layout, attn, CLIPAttention(cfg)),
        ("block", Block(d, h, f).apply, Block(d, h, f), CLIPEncoderLayer(cfg)),
    ]

    def timed(fn):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = clock()
            fn()
            best = min(best, clock() - t0)
        return best

    rows = []
    for name, apply, module, peer in parts:
        params = module.init(jax.random.key(0), jx)
        grad = jax.jit(jax.grad(lambda p, x, apply=apply: jnp.sum(jnp.tanh(apply(p, x))), argnums=(0, 1)))

        def torch_run(peer=peer):
            tx.grad = None
            peer.zero_grad()
            out = peer(tx) if isinstance(peer, CLIPMLP) else peer(tx, None)
            out = out[0] if isinstance(out, tuple) else out
            torch.tanh(out).sum().backward()

        tj = timed(lambda grad=grad, params=params: jax.block_until_ready(grad(params, jx)))
        rows.append((name, tj, timed(torch_run)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--impls", default="einsum,einsum_bthd,dot_product")
    parser.add_argument("--threads", type=int, default=0, help="1 = single-threaded both sides")
    parser.add_argument(
        "--layer",
        default="32,65,256,4,1024",
        help="B,T,D,H,F of the per-layer table (B/16: 8,197,768,12,3072)",
    )
    parser.add_argument("--layer-only", action="store_true", help="skip the whole-model table")
    parser.add_argument(
        "--malloc",
        choices=("auto", "tuned", "glibc"),
        default="auto",
        help="glibc malloc settings of the process (both sides): auto = as the trainer's "
        "`malloc: auto` (tuned on the CPU, encoder/host_malloc.py); glibc = its defaults",
    )
    args = parser.parse_args()
    from clocmllm.encoder.trainer import wants_malloc_reuse

    if wants_malloc_reuse({"tuned": "reuse", "glibc": "glibc", "auto": "auto"}[args.malloc]):
        from clocmllm.encoder.host_malloc import reuse_freed_memory, synchronous_cpu_client

        reuse_freed_memory()  # before either framework starts its threads
        synchronous_cpu_client()
    if args.threads == 1 and hasattr(os, "sched_setaffinity"):  # see bench_train_step.py
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if args.threads == 1:  # must be set before jax initialises its CPU client
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            " intra_op_parallelism_threads=1"
        )

    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    # Single-threaded, process CPU time measures the work itself, immune to other
    # processes sharing the cores; with several threads, wall time (spin-waits excluded).
    clock = time.process_time if threads == 1 else time.perf_counter
    b, t, d, h, f = (int(v) for v in args.layer.split(","))
    if args.layer_only:
        print_layer_table(clock, args.repeats, b, t, d, h, f)
        return
    steps = jax_steps(args.batch, args.impls.split(","))
    steps["torch[HF CLIPModel]"] = torch_step(args.batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, run in steps.items():
            t0 = clock()
            run()
            times[name].append(clock() - t0)
    ref = statistics.median(times["torch[HF CLIPModel]"])
    kind = "CPU" if threads == 1 else "wall"
    print(f"CLIP grad step, batch {args.batch}, {threads} thread(s), {kind} time, {args.repeats} repeats")
    print(f"{'implementation':<24}{'median s':>10}{'speed vs torch':>16}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<24}{med:>10.4f}{ref / med:>15.2f}x")
    print()
    print_layer_table(clock, args.repeats, b, t, d, h, f)


def print_layer_table(clock, repeats: int, b: int, t: int, d: int, h: int, f: int) -> None:
    print(f"one ViT layer's gradient, B={b} T={t} D={d} H={h} F={f}, best of {repeats}")
    print(f"{'part':<26}{'jax ms':>9}{'torch ms':>10}{'speed vs torch':>16}")
    for name, tj, tt in layer_parts(clock, repeats, b, t, d, h, f):
        print(f"{name:<26}{1e3 * tj:>9.1f}{1e3 * tt:>10.1f}{tt / tj:>15.2f}x")


if __name__ == "__main__":
    main()
