"""Full training step: our JAX CLIP/CLOC step vs Hugging Face `CLIPModel` (PyTorch eager, AdamW).

Command:  .venv/bin/python scripts/bench/bench_train_step.py [--presets tiny vit_s16] [--steps 5]
Expected: ~3 min for tiny, ~6-10 min with vit_s16 on 2 idle cores (much longer when the
box is loaded). Prints, per preset, the median step time of each variant, its speed relative
to PyTorch (>1 = faster than PyTorch; process CPU time with `--threads 1`, wall time
otherwise), the CLOC step's overhead over our CLIP step (M=4) next to its model-FLOP
overhead (`encoder/flops.py`: what the overhead would be if the region work ran at the CLIP
step's FLOP/s), first-compile time, peak RSS, model GFLOP a step and GFLOP/s achieved.
Each variant runs in its own subprocess (so peak memory is its own), the variants of a
preset one after the other; `--rounds 2` repeats the sequence and keeps each variant's best
median, which evens out load drift.
`--pieces` times the step's pieces instead (forward+loss, vision tower fwd and fwd+bwd, whole
fwd+bwd, optimizer update), best of --steps, on both sides: where the time goes (~1 min at
tiny, ~4 min at vit_s16 with --steps 2, single-threaded).

Step = forward of both towers + loss + backward + global-norm clipping + AdamW update, the
same work on both sides (CLIP softmax loss; HF `return_loss=True`). The CLOC step adds the
region-text, prompter and grounding terms over M=4 regions an image; its region phrases are
SOT + 2-6 random words + EOT padded to 16 tokens, then cut after the longest first EOT to a
bucket length (8 here) exactly as the trainer does (`trim_region_text`), then each distinct
phrase is encoded once (`dedup_region_text`, the trainer's `data.dedup_phrases`), then the
phrases are packed end to end into rows of 16 tokens with their shared SOT computed once
(`pack_region_phrases`) where the trainer's `data.pack_phrases: auto` packs (text width >=
256: ViT-S/16, not tiny). `jax:cloc_packed:einsum` always packs, `jax:cloc_unpacked:einsum`
never (the CLOC step before session 9), `jax:cloc_nodedup:einsum` neither packs nor
de-duplicates, `jax:cloc_untrimmed:einsum` does none of the three (all 16 tokens).
Captions are never packed here: the trainer's `data.pack_captions` is off by default, and
this bench's captions are of one length, which packing cannot shorten. `--phrases world`
draws the phrases from the synthetic world's 112 instead of random words: real phrase data
repeats, the random phrases never do (report both).
Captions are 32 tokens with EOT at position 20, cut to 24 on both sides as the trainer cuts
them (`trim_captions`; before session 8 both sides ran all 32).
Our CLIP step runs the last vision block at the class token only (`VisionTower.embed`); the
CLOC step cannot (its prompter reads every token). `jax:clip_tokens:einsum` is the CLIP step
with the last block over every token, as HF computes it: the CLOC overhead over it is the
cost of the region work alone, the overhead over `jax:clip:einsum` also that of the tokens.
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


def clock() -> float:
    """Process CPU time when single-threaded (BENCH_THREADS=1): other jobs on a shared box do
    not inflate it, unlike wall time; wall time otherwise (CPU time would sum the threads)."""
    return time.process_time() if os.environ.get("BENCH_THREADS") == "1" else time.perf_counter()


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


def world_phrases() -> list[list[int]]:
    """The synthetic world's 112 region phrases ('size colour shape') as SOT + 3 word ids + EOT."""
    from clocmllm.data.world_vocab import class_names

    names = class_names()
    words = sorted({w for n in names for w in n.split()})
    return [[1, *(2 + words.index(w) for w in n.split()), VOCAB - 1] for n in names]


def step_batch(mc, batch: int) -> dict:
    """`fake_batch` with its captions cut after their longest first EOT (position 20: 32 ->
    24 tokens) as the trainer cuts them (`trim_captions`); both sides of this bench get it."""
    from clocmllm.encoder.input_pipeline import trim_captions

    return trim_captions(fake_batch(mc, batch), mc.eot_token_id)


def random_phrases(
    rng: np.random.Generator, batch: int, m: int, tokens: int, vocab: int, eot: int
) -> np.ndarray:
    """[batch, m, tokens] region phrases, SOT (1) + 2-6 random word ids + EOT each, zero padded:
    no two alike, unlike real phrase data (bench_mfu.py draws its CLOC phrases here too)."""
    out = np.zeros((batch, m, tokens), np.int32)
    words = rng.integers(2, 7, (batch, m))
    for i, j in np.ndindex(batch, m):
        n = int(words[i, j])
        out[i, j, : n + 2] = [1, *rng.integers(2, vocab - 1, n), eot]
    return out


def fake_batch(mc, batch: int, m: int = 4) -> dict:
    rng = np.random.default_rng(0)
    text = rng.integers(1, VOCAB - 1, (batch, CONTEXT)).astype(np.int32)
    text[:, 20] = VOCAB - 1
    # region phrases as the trainer sees them, zero padded to 16 tokens; BENCH_PHRASES=random:
    # SOT + 2-6 random words + EOT (no two alike); world: one of the synthetic world's 112
    # phrases each, uniformly (world_scene draws size, colour and shape uniformly and
    # independently), so a batch repeats phrases as the world's data does
    rtext = np.zeros((batch, m, REGION_CONTEXT), np.int32)
    if os.environ.get("BENCH_PHRASES", "random") == "world":
        vocab = world_phrases()
        for i, j in np.ndindex(batch, m):
            p = vocab[int(rng.integers(len(vocab)))]
            rtext[i, j, : len(p)] = p
    else:
        rtext = random_phrases(rng, batch, m, REGION_CONTEXT, VOCAB, VOCAB - 1)
    x1 = rng.random((batch, m, 2)).astype(np.float32) * 0.5
    return {
        "images": rng.normal(size=(batch, mc.image_size, mc.image_size, 3)).astype(np.float32),
        "text": text,
        "region_boxes": np.concatenate([x1, x1 + 0.4], -1),
        "region_valid": np.ones((batch, m), bool),
        "region_text": rtext,
    }


def trainer_step(mc, mode: str, compiler_options: dict | None = None):
    """The trainer's jitted step for a model config, as `train()` builds it on one device
    (donated state, `step_compiler_options` unless `compiler_options` is given): (step,
    abstract state, state init function). Shared by this bench, bench_mfu.py and
    bench_step_memory.py."""
    import jax

    from clocmllm.encoder.models.clip import CLIP
    from clocmllm.encoder.optimizer import build_optimizer
    from clocmllm.encoder.trainer import (
        DEFAULTS,
        abstract_state,
        deep_merge,
        make_train_step,
        step_compiler_options,
    )

    model = CLIP(mc)
    cfg = deep_merge(DEFAULTS, {"mode": mode})
    tx, sched = build_optimizer(cfg["optim"], 1000)
    abstract, init = abstract_state(model, tx, 0)
    step = jax.jit(
        make_train_step(model, tx, sched, cfg),
        donate_argnums=(0,),
        compiler_options=step_compiler_options(mc.remat) if compiler_options is None else compiler_options,
    )
    return step, abstract, init


def timed_steps(mc, mode: str, host: dict, steps: int, clock=time.perf_counter) -> dict:
    """Compile the trainer's step for `host`, run it steps + 1 times (the first is a warm-up):
    compile_s, step_s (median), the compiled step, the last metrics, state and device batch."""
    import jax

    step, _, init = trainer_step(mc, mode)
    state = jax.jit(init)()
    batch = {k: jax.device_put(v) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps + 1):
        t0 = clock()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(clock() - t0)
    return {
        "compile_s": compile_s,
        "step_s": statistics.median(times[1:]),
        "compiled": compiled,
        "metrics": metrics,
        "state": state,
        "batch": batch,
    }


def run_jax(preset: str, mode: str, steps: int, impl: str) -> dict:
    from clocmllm.encoder.batch_prep import BatchPrep, PrepSettings
    from clocmllm.encoder.flops import batch_step_flops
    from clocmllm.encoder.text_packing import wants_packing

    mc = model_config(preset, impl)
    host = step_batch(mc, BATCH[preset])  # captions already cut, on both sides
    # distinct phrases; the cut after the first EOT keeps rows apart (only padding follows it)
    unique = len(np.unique(host["region_text"].reshape(-1, host["region_text"].shape[-1]), axis=0))
    # the trainer's batch preparation (encoder/batch_prep.py) for one batch, per variant
    cloc = ("cloc", "cloc_packed", "cloc_unpacked")
    prep = BatchPrep(
        PrepSettings(
            eot_token_id=mc.eot_token_id,
            trim_phrases=mode in (*cloc, "cloc_nodedup"),
            dedup_phrases=mode in cloc,
            pack_phrases=mode == "cloc_packed" or (mode == "cloc" and wants_packing("auto", mc.text_width)),
        )
    )
    host = prep(host)
    if mode == "clip_tokens":
        # The CLIP step as HF's CLIPModel (and our trainer before session 8) computes it: the
        # last vision block over every token, although the loss reads the class token only.
        # The CLOC step needs every token (its prompter reads them), so the CLOC overhead over
        # this variant is the cost of the region work alone. Bench-only: this subprocess's
        # VisionTower.embed is replaced by what it shortcuts.
        from clocmllm.encoder.models.vision import VisionTower

        VisionTower.embed = lambda self, images: self.pool(self.tokens(images))
    if mode in ("clip", "clip_tokens"):
        host = {k: host[k] for k in ("images", "text")}
    res = timed_steps(mc, "clip" if mode in ("clip", "clip_tokens") else "cloc", host, steps, clock)
    out = {
        "compile_s": res["compile_s"],
        "step_s": res["step_s"],
        "loss": float(res["metrics"]["loss"]),
        "model_flops": batch_step_flops(mc, host, image_tokens=mode == "clip_tokens"),
    }
    if "text_pack_tokens" in host:
        out["captions"] = "packed {} x {} tokens".format(*host["text_pack_tokens"].shape)
    if mode not in ("clip", "clip_tokens"):
        out["phrases"] = f"{unique}/{host['region_valid'].size}"
        if "region_phrases" in host:
            out["phrases"] += f" -> {len(host['region_phrases'])} rows"
        if "region_pack_tokens" in host:
            r, w = host["region_pack_tokens"].shape
            shared = ", shared first token" if "region_pack_sot" in host else ""
            out["phrases"] += f" -> packed {r} x {w} tokens{shared}"
    return out


def hf_clip_model(mc):
    """HF `CLIPModel` of a ModelConfig's sizes (vocabulary, context and EOT included), in
    training mode: the PyTorch peer of this bench and of bench_mfu.py."""
    from transformers import CLIPConfig, CLIPModel

    common = {"hidden_act": mc.hidden_act, "layer_norm_eps": mc.layer_norm_eps, "attention_dropout": 0.0}
    cfg = CLIPConfig(
        text_config={"vocab_size": mc.vocab_size, "hidden_size": mc.text_width, "intermediate_size": mc.text_mlp_dim,
                     "num_hidden_layers": mc.text_layers, "num_attention_heads": mc.text_heads,
                     "max_position_embeddings": mc.context_length, "eos_token_id": mc.eot_token_id,
                     "pad_token_id": mc.pad_token_id, "bos_token_id": 1, **common},
        vision_config={"hidden_size": mc.vision_width, "intermediate_size": mc.vision_mlp_dim,
                       "num_hidden_layers": mc.vision_layers, "num_attention_heads": mc.vision_heads,
                       "image_size": mc.image_size, "patch_size": mc.patch_size, **common},
        projection_dim=mc.embed_dim,
    )  # fmt: skip
    return CLIPModel(cfg).train()


def _torch_setup(preset: str):
    """HF CLIPModel of the preset's sizes, its AdamW, and the batch as torch tensors."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    mc = model_config(preset)
    model = hf_clip_model(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    b = step_batch(mc, BATCH[preset])
    pixels = torch.from_numpy(b["images"]).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(b["text"]).long()
    return model, opt, pixels, ids


def run_torch(preset: str, steps: int) -> dict:
    model, opt, pixels, ids = _torch_setup(preset)
    import torch

    from clocmllm.encoder.flops import batch_step_flops

    times = []
    for _ in range(steps + 1):
        t0 = clock()
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(clock() - t0)
    return {
        "compile_s": times[0] - statistics.median(times[1:]),
        "step_s": statistics.median(times[1:]),
        "loss": float(out.loss),
        "model_flops": batch_step_flops(model_config(preset), {"text": ids}),
    }


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def pieces_jax(preset: str, steps: int) -> dict:
    """Step pieces of our CLIP step, for `--pieces` (where the time goes)."""
    import jax
    import jax.numpy as jnp

    from clocmllm.encoder.models.clip import CLIP
    from clocmllm.encoder.optimizer import build_optimizer
    from clocmllm.encoder.trainer import DEFAULTS, abstract_state, deep_merge, make_loss_fn

    mc = model_config(preset)
    model = CLIP(mc)
    cfg = deep_merge(DEFAULTS, {"mode": "clip"})
    tx, _ = build_optimizer(cfg["optim"], 1000)
    _, init = abstract_state(model, tx, 0)
    state = jax.jit(init)()
    b = step_batch(mc, BATCH[preset])
    batch = {k: jnp.asarray(b[k]) for k in ("images", "text")}
    loss = make_loss_fn(model, cfg)
    fwd = jax.jit(lambda p, bt: loss(p, bt)[0])
    vis = jax.jit(lambda p, im: jnp.sum(model.apply({"params": p}, im, method="encode_image_tokens") ** 2))
    vis_g = jax.jit(
        jax.grad(lambda p, im: jnp.sum(model.apply({"params": p}, im, method="encode_image_tokens") ** 2))
    )
    grad = jax.jit(jax.grad(lambda p, bt: loss(p, bt)[0]))
    grads = grad(state.params, batch)
    upd = jax.jit(lambda g, o, p: tx.update(g, o, p)[0])
    ready = jax.block_until_ready
    return {
        "forward+loss": _best(lambda: ready(fwd(state.params, batch)), steps),
        "vision fwd": _best(lambda: ready(vis(state.params, batch["images"])), steps),
        "vision fwd+bwd": _best(lambda: ready(vis_g(state.params, batch["images"])), steps),
        "fwd+bwd": _best(lambda: ready(grad(state.params, batch)), steps),
        "optimizer": _best(lambda: ready(upd(grads, state.opt_state, state.params)), steps),
    }


def pieces_torch(preset: str, steps: int) -> dict:
    """The same pieces of HF `CLIPModel` + AdamW."""
    import torch

    model, opt, pixels, ids = _torch_setup(preset)

    def fwd():
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels, return_loss=True)

    def vis():
        with torch.no_grad():
            (model.vision_model(pixel_values=pixels).last_hidden_state ** 2).sum()

    def vis_g():
        (model.vision_model(pixel_values=pixels).last_hidden_state ** 2).sum().backward()

    def grad():
        model(input_ids=ids, pixel_values=pixels, return_loss=True).loss.backward()

    def upd():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    names = ("forward+loss", "vision fwd", "vision fwd+bwd", "fwd+bwd", "optimizer")
    return {n: _best(f, steps) for n, f in zip(names, (fwd, vis, vis_g, grad, upd), strict=True)}


def one(kind: str, preset: str, steps: int) -> None:
    if os.environ.get("BENCH_THREADS") == "1" and hasattr(os, "sched_setaffinity"):
        # One CPU for the whole process, before XLA/torch start threads: with
        # --xla_cpu_multi_thread_eigen=false XLA still runs independent thunks on two worker
        # threads, which spin on an idle second core and inflate process CPU time (tiny CLOC
        # step at load 1.5: 198 ms unpinned, 129 ms pinned; docs/benchmarks.md item 6).
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from clocmllm.encoder.trainer import wants_malloc_reuse

    mode = {"tuned": "reuse", "glibc": "glibc", "auto": "auto"}[os.environ.get("BENCH_MALLOC", "auto")]
    if wants_malloc_reuse(mode):
        from clocmllm.encoder.host_malloc import reuse_freed_memory, synchronous_cpu_client

        # what the trainer does (config `malloc`), applied to both sides (host_malloc.py); the
        # synchronous client only matters to JAX (PyTorch's eager ops are synchronous anyway)
        reuse_freed_memory()
        if not kind.endswith("torch"):
            synchronous_cpu_client()
    if kind.startswith("pieces:"):
        res = {"pieces": (pieces_torch if kind == "pieces:torch" else pieces_jax)(preset, steps)}
    elif kind == "torch":
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
    ap.add_argument(
        "--pieces",
        action="store_true",
        help="instead of whole steps, time the step's pieces (forward+loss, vision tower fwd and "
        "fwd+bwd, fwd+bwd, optimizer update) on both sides, best of --steps",
    )
    ap.add_argument(
        "--malloc",
        choices=("auto", "tuned", "glibc"),
        default="auto",
        help="auto: both sides use the glibc malloc settings when the trainer's `malloc: auto` "
        "would (clocmllm.encoder.host_malloc, trainer.wants_malloc_reuse: whenever JAX runs on "
        "the CPU); tuned: always; glibc: never",
    )
    ap.add_argument(
        "--phrases",
        choices=("random", "world"),
        default="random",
        help="CLOC region phrases: random (2-6 random words, no repeats: de-duplication cannot "
        "help) or world (the synthetic world's 112 phrases, drawn uniformly: a batch repeats them)",
    )
    ap.add_argument("--one", nargs=2, metavar=("KIND", "PRESET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], args.one[1], args.steps)
        return
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "BENCH_MALLOC": args.malloc,
        "BENCH_PHRASES": args.phrases,
    }
    if args.threads:
        env["BENCH_THREADS"] = str(args.threads)
        if args.threads == 1:
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "")
                + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            ).strip()
    print(
        f"cores={os.cpu_count()} threads={args.threads or 'all'} load={os.getloadavg()[0]:.1f} "
        f"steps={args.steps} rounds={args.rounds} malloc={args.malloc} phrases={args.phrases}"
    )
    if args.pieces:
        for preset in args.presets:
            rows = {}
            for kind in ("pieces:torch", "pieces:jax"):
                cmd = [sys.executable, __file__, "--one", kind, preset, "--steps", str(args.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"{preset} {kind} FAILED:\n{proc.stderr[-2000:]}")
                    return
                rows[kind] = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6 :].splitlines()[0])
            t, j = rows["pieces:torch"], rows["pieces:jax"]
            print(f"\n{preset}: batch {BATCH[preset]}, load {os.getloadavg()[0]:.1f}")
            print(f"  {'piece':16s} {'jax ms':>9s} {'torch ms':>9s} {'vs torch':>9s}")
            for name, tj in j["pieces"].items():
                tt = t["pieces"][name]
                print(f"  {name:16s} {1000 * tj:9.1f} {1000 * tt:9.1f} {tt / tj:8.2f}x")
            print(f"  peak MB: jax {j['peak_rss_mb']:.0f}, torch {t['peak_rss_mb']:.0f}")
        return
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
        print(
            f"  {'variant':22s} {'step ms':>9s} {'vs torch':>9s} {'compile s':>10s} {'peak MB':>8s}"
            f" {'GFLOP':>7s} {'GFLOP/s':>8s}"
        )
        for kind, res in best.items():
            ratio = f"{torch_s / res['step_s']:.2f}x" if torch_s else "-"
            gflop = res.get("model_flops", 0) / 1e9
            rate = f"{gflop / res['step_s']:8.1f}" if gflop else f"{'-':>8s}"
            print(
                f"  {kind:22s} {1000 * res['step_s']:9.1f} {ratio:>9s} {res['compile_s']:10.1f} {res['peak_rss_mb']:8.0f}"
                f" {gflop:7.2f} {rate}"
            )
        for kind, res in best.items():
            if "phrases" in res:
                print(f"  {kind}: distinct/all phrases {res['phrases']}")
            if "captions" in res:
                print(f"  {kind}: captions {res['captions']}")
        whats = {
            "jax:cloc:einsum": "",
            "jax:cloc_packed:einsum": ", phrases packed",
            "jax:cloc_unpacked:einsum": ", phrases not packed",
            "jax:cloc_nodedup:einsum": ", phrases not de-duplicated nor packed",
            "jax:cloc_untrimmed:einsum": ", phrases untrimmed, not de-duplicated",
        }
        bases = {"jax:clip:einsum": "our CLIP step", "jax:clip_tokens:einsum": "the all-tokens CLIP step"}
        for base, name in bases.items():
            for cloc, what in whats.items():
                if base in best and cloc in best:
                    over = best[cloc]["step_s"] / best[base]["step_s"] - 1
                    floor = best[cloc]["model_flops"] / best[base]["model_flops"] - 1
                    print(
                        f"  CLOC step overhead over {name} (M=4{what}): {100 * over:+.1f}% "
                        f"(model FLOPs {100 * floor:+.1f}%: the overhead at equal FLOP/s)"
                    )


if __name__ == "__main__":
    main()
