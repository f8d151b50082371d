"""Where a profiled step's device time goes: a table from a JAX Perfetto trace.

Command: python scripts/bench/trace_summary.py TRACE_DIR [--steps 3] [--top 25]
(TRACE_DIR as written by `bench_mfu.py --profile DIR`, which traces 3 steps; any folder that
holds a `perfetto_trace.json.gz`). Expected: a second; prints the device's busy time a step
by kernel class (GEMM, attention, fusions, ...), the idle share of the traced span, and the
costliest kernels. Kernel classes are read off kernel names (cuBLAS/CUTLASS GEMMs, cuDNN
attention, XLA fusions, Triton), so they are a guide, not an exact attribution. On a CPU
trace (no device process) it lists the host's events instead. These nest (Python frames
around XLA thunks), so their sum overstates the busy time there: read only the kernel list.
With several concurrent device streams, the busy time can also exceed the span.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

CLASSES = (  # first match wins; lower-case substrings of kernel names
    ("attention (cuDNN / flash)", ("cudnn", "flash", "fmha", "attn")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("Triton fusion", ("triton",)),
    ("reduction fusion", ("reduce", "input_")),
    ("elementwise / loop fusion", ("loop_", "fusion", "wrapped_", "convert", "transpose", "copy")),
    ("memcpy / memset", ("memcpy", "memset")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, keys in CLASSES:
        if any(k in low for k in keys):
            return label
    return "other"


def load_events(folder: Path) -> tuple[list[dict], str]:
    """Complete ('X') events of the device processes (or of the host, when there is none)."""
    files = sorted(folder.rglob("perfetto_trace.json.gz"))
    if not files:
        raise SystemExit(f"{folder}: no perfetto_trace.json.gz under it (bench_mfu.py --profile writes one)")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {
        e["pid"]: e["args"].get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, name in procs.items() if "/device:" in name}
    where = ", ".join(sorted(procs[p] for p in device)) if device else "host (no device process in the trace)"
    keep = device or set(procs)
    # a device process also carries derived lines ("XLA Ops", "XLA Modules", "Steps") over the
    # same time: keep its CUDA stream lines only, where it has them, so no kernel counts twice
    threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in keep}  # fmt: skip
    streams = {key for key, name in threads.items() if "stream" in name.lower()}
    timed = [e for e in events if e.get("ph") == "X" and e["pid"] in keep and "dur" in e]
    if streams:
        timed = [e for e in timed if (e["pid"], e["tid"]) in streams]
        where += f" ({len(streams)} streams: {', '.join(sorted({threads[k] for k in streams}))})"
    return timed, where


def summarise(folder: Path, steps: int, top: int) -> dict:
    events, where = load_events(folder)
    if not events:
        raise SystemExit(f"{folder}: the trace holds no timed events")
    busy = collections.Counter()
    count = collections.Counter()
    for e in events:
        busy[e["name"]] += e["dur"]
        count[e["name"]] += 1
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    total = sum(busy.values())
    by_class = collections.Counter()
    for name, us in busy.items():
        by_class[kernel_class(name)] += us
    print(f"{folder}: {where}; {len(events)} events over {steps} steps")
    print(f"  traced span {span / steps / 1000:.1f} ms a step, kernels busy {total / steps / 1000:.1f} ms a step "
          f"(idle: {100 * (1 - total / span):.1f}% of the span; negative = streams overlapped)")  # fmt: skip
    print(f"  {'class':30s} {'ms/step':>8s} {'share':>6s}")
    for label, us in by_class.most_common():
        print(f"  {label:30s} {us / steps / 1000:8.2f} {100 * us / total:5.1f}%")
    print(f"  {'kernel':70s} {'calls/step':>10s} {'ms/step':>8s}")
    for name, us in busy.most_common(top):
        print(f"  {name[:70]:70s} {count[name] / steps:10.1f} {us / steps / 1000:8.2f}")
    return {"span_ms": span / steps / 1000, "busy_ms": total / steps / 1000,
            "classes": {k: v / steps / 1000 for k, v in by_class.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace_dir", type=Path)
    ap.add_argument("--steps", type=int, default=3, help="steps in the trace (bench_mfu.py --profile: 3)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    return summarise(args.trace_dir, args.steps, args.top)


if __name__ == "__main__":
    main()
