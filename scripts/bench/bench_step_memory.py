"""Host memory of the encoder's training step on the CPU: heap growth per step, and the temp
buffer XLA plans with and without remat.

    .venv/bin/python scripts/bench/bench_step_memory.py heap [--preset vit_s16] [--steps 14] \
        [--client sync|async] [--malloc tuned|glibc] [--remat]
    .venv/bin/python scripts/bench/bench_step_memory.py temp [--preset vit_s16]

`heap` runs the trainer's CLIP step `--steps` times in one process, one thread pinned to one
CPU, and prints after each step its CPU time, kernel (sys) time, minor page faults and the
process RSS. Expected at vit_s16 (~3 min): with `--malloc tuned --client sync` (what the trainer
does on a CPU) RSS flat at ~4.8 GB and 0 faults after step 0; with `--client async` the heap
grew by one 3.3 GB temp buffer at step 3 or 4 in 3 of 4 runs (docs/benchmarks.md, "where the
CPU time goes", item 8). `temp` compiles (nothing runs) the CLIP and CLOC steps with and
without `remat` and XLA CPU's memory-optimised scheduler and prints each temp buffer (~1 min).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def heap(args) -> None:
    import jax
    from bench_train_step import BATCH, fake_batch, model_config, trainer_step

    mc = model_config(args.preset).replace(remat=args.remat)
    step, _, init = trainer_step(mc, "clip")
    state = jax.jit(init)()
    host = fake_batch(mc, BATCH[args.preset])
    batch = {k: jax.device_put(host[k]) for k in ("images", "text")}
    compiled = step.lower(state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(
        f"{args.preset} CLIP step, batch {BATCH[args.preset]}, remat {args.remat}: temp buffer {temp:.0f} MB"
    )
    for i in range(args.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(
            f"step {i:2d}  cpu {time.process_time() - t0:6.2f} s  sys {r1.ru_stime - r0.ru_stime:5.2f} s  "
            f"faults {r1.ru_minflt - r0.ru_minflt:7d}  rss {rss_mb():6.0f} MB",
            flush=True,
        )


def temp(args) -> None:
    import jax
    from bench_train_step import BATCH, fake_batch, model_config, trainer_step

    from clocmllm.encoder.trainer import step_compiler_options

    b = BATCH[args.preset]
    print(f"{args.preset}, batch {b}: XLA temp buffer, MB")
    print(f"  {'step':5s} {'no remat':>9s} {'remat':>9s} {'remat+mem':>10s} {'mem only':>9s}")
    for mode in ("clip", "cloc"):
        row = []
        for remat, scheduler in ((False, False), (True, False), (True, True), (False, True)):
            mc = model_config(args.preset).replace(remat=remat)
            step, abstract, _ = trainer_step(mc, mode, step_compiler_options(scheduler) or {})
            host = fake_batch(mc, b)
            if mode == "clip":
                host = {k: host[k] for k in ("images", "text")}
            batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
            row.append(step.lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes / 2**20)
        print(f"  {mode:5s} " + " ".join(f"{v:9.0f}" for v in row[:2]) + f" {row[2]:10.0f} {row[3]:9.0f}")
    print("  (remat+mem: what the trainer compiles for `remat: true`; mem only: the scheduler without remat)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("heap", "temp"))
    ap.add_argument("--preset", default="vit_s16")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--client", choices=("sync", "async"), default="sync")
    ap.add_argument("--malloc", choices=("tuned", "glibc"), default="tuned")
    ap.add_argument("--remat", action="store_true")
    args = ap.parse_args()
    if args.what == "heap":  # all of this before JAX starts its CPU client
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        from clocmllm.encoder.host_malloc import reuse_freed_memory, synchronous_cpu_client

        if args.malloc == "tuned":
            reuse_freed_memory()
        if args.client == "sync":
            synchronous_cpu_client()
        heap(args)
    else:
        temp(args)


if __name__ == "__main__":
    sys.exit(main())
