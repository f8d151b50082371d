"""The CPU trainer under glibc malloc settings: why `host_malloc.reuse_freed_memory` sets what it sets.

Command:  .venv/bin/python scripts/bench/bench_trainer_malloc.py --world W [--steps 300]
          (W: `clocmllm world --out W --train 2000 --eval 200 --seed 0`)
Expected: ~4 min at 300 steps on 2 idle cores. Prints, per setting, the wall time of
`train()` (the `tiny` CLOC recipe, scripts/recipes/tiny_cloc.yaml, no evals), its median
logged step, the process's user and sys CPU seconds, minor page faults and final loss; the
losses must be identical (malloc changes no arithmetic). Measured 2026-11-23 (docs/benchmarks.md
item 11): 43.6 s with the trainer's settings, 67.0 s with the one-arena cap they had until
session 10, 43.8 / 44.1 s on glibc's defaults (sync / async client).

Each setting runs in its own process, since glibc and JAX's CPU client read their settings
once, before the first allocation / device use; `malloc: glibc` keeps `train()` from applying
its own on top.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# name -> (mallopt (param, value) pairs, synchronous JAX CPU client)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = {
    "trainer (no mmap, no trim; sync)": ("trainer", True),
    "one-arena cap too (until session 10; sync)": (
        [(M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)],
        True,
    ),
    "glibc defaults (sync)": ([], True),
    "glibc defaults (async)": ([], False),
}

CHILD = """
import ctypes, ctypes.util, json, resource, statistics, sys, tempfile
pairs, sync, world, steps = json.loads(sys.argv[1])
if pairs == "trainer":
    from clocmllm.encoder.host_malloc import reuse_freed_memory
    assert reuse_freed_memory()
else:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    for param, value in pairs:
        assert libc.mallopt(param, value) == 1, (param, value)
if sync:
    from clocmllm.encoder.host_malloc import synchronous_cpu_client
    synchronous_cpu_client()
from clocmllm.encoder.trainer import apply_overrides, load_recipe, train
cfg = apply_overrides(load_recipe("scripts/recipes/tiny_cloc.yaml"), [
    "malloc=glibc", "eval_every=0", "eval.at_end=false", "log_every=1", "progress=false"])
with tempfile.TemporaryDirectory() as workdir:
    out = train(cfg, workdir, data=world, steps=steps)
    rows = [json.loads(x) for x in open(workdir + "/metrics.jsonl")]
times = [r["step_time"] for r in rows if "step_time" in r][5:]
ru = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT" + json.dumps({"wall_s": out["wall_s"], "median_ms": 1e3 * statistics.median(times),
    "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "faults": ru.ru_minflt, "loss": out["final"]["loss"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", required=True, help="a synthetic world folder (clocmllm world --out W ...)")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    print(
        f"{'setting':45s} {'wall s':>7s} {'median ms':>9s} {'user s':>7s} {'sys s':>6s} {'faults':>8s}  loss"
    )
    losses = set()
    for name, (pairs, sync) in SETTINGS.items():
        arg = json.dumps([pairs, sync, args.world, args.steps])
        proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{name}: failed\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        r = json.loads(line[len("RESULT") :])
        losses.add(r["loss"])
        print(f"{name:45s} {r['wall_s']:7.1f} {r['median_ms']:9.1f} {r['user_s']:7.1f} {r['sys_s']:6.1f} "
              f"{r['faults'] / 1e6:7.2f}M  {r['loss']!r}")  # fmt: skip
    print("losses identical" if len(losses) == 1 else f"LOSSES DIFFER: {sorted(losses)}")


if __name__ == "__main__":
    main()
