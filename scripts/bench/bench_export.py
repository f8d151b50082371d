"""Benchmark: `clocmllm export` (JAX checkpoint -> HF CLIPVisionModel folder, parity included).

Command:   HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench/bench_export.py [--presets b16 l14]
Expected:  about 3-4 minutes on an idle 2-core machine (most of it making the random
           checkpoints, which is not timed). Targets: L/14 export <= 30 s on 2 cores, peak
           memory <= 3x the weights.
Result:    per preset: weight size (whole checkpoint and the vision tower written), export
           wall time and CPU seconds with its split (restore / write / JAX parity / PyTorch parity), peak RSS
           of the export process, its RSS after imports (the runtime's own share), and
           (peak - runtime) / checkpoint weights. Peer, in the same script and on the same
           shapes: a plain transformers round trip of the same tower (random init,
           `save_pretrained`, `from_pretrained`, one forward on the same 4 images), the
           floor any exporter with a parity check pays. Each measurement runs in its own
           process so peak RSS is that step's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

MAKE_CKPT = """
import jax, numpy as np, sys
from clocmllm.encoder.config import load_model_config
from clocmllm.encoder.models.clip import CLIP
from clocmllm.encoder.checkpoints import save_params
cfg = load_model_config(sys.argv[1])
model = CLIP(cfg)
params = jax.jit(lambda r: model.init(r, *model.dummy_inputs(1))["params"])(jax.random.key(0))
params = jax.tree.map(np.asarray, params)
save_params(sys.argv[2], {"model": cfg.to_dict()}, params, 1)
"""

MEASURE = """
import json, resource, sys, time
def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
"""

EXPORT = (
    MEASURE
    + """
import jax, torch, transformers  # the runtime, loaded before the baseline reading
from clocmllm.adapters.export import export_encoder
base = rss_mb()
t, c = time.perf_counter(), cpu_s()
report = export_encoder(sys.argv[1], sys.argv[2], force=True, verbose=False)
wall, cpu = time.perf_counter() - t, cpu_s() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall": wall, "cpu": cpu, "base_mb": base, "peak_mb": peak, "seconds": report["seconds"],
                  "max_diff": max(report["parity"]["diffs"].values()),
                  "vision_bytes": report["files"]["model.safetensors"]["bytes"]}))
"""
)

PEER = (
    MEASURE
    + """
import numpy as np, torch, transformers
from transformers import CLIPVisionConfig, CLIPVisionModel
from clocmllm.adapters.hf_config import vision_config
from clocmllm.encoder.config import load_model_config
cfg = load_model_config(sys.argv[1])
torch.manual_seed(0)
base = rss_mb()
t, c = time.perf_counter(), cpu_s()
model = CLIPVisionModel(CLIPVisionConfig(**vision_config(cfg))).eval()
model.save_pretrained(sys.argv[2])
del model
model = CLIPVisionModel.from_pretrained(sys.argv[2]).eval()
with torch.no_grad():
    model(pixel_values=torch.randn(4, 3, cfg.image_size, cfg.image_size), output_hidden_states=True)
wall, cpu = time.perf_counter() - t, cpu_s() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall": wall, "cpu": cpu, "base_mb": base, "peak_mb": peak}))
"""
)


def child(script: str, *args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"child failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def checkpoint_bytes(workdir: str) -> int:
    total = 0
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["b16", "l14"])
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}, cpus {os.cpu_count()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for preset in args.presets:
            wd, out, peer_out = (os.path.join(tmp, f"{preset}_{n}") for n in ("wd", "out", "peer"))
            child(MAKE_CKPT, preset, wd)
            weights_mb = checkpoint_bytes(wd) / 2**20
            exp = child(EXPORT, wd, out)
            peer = child(PEER, preset, peer_out)
            rows.append((preset, weights_mb, exp, peer))
            print(f"{preset}: done (load average {os.getloadavg()[0]:.1f})", flush=True)
    print()
    head = (
        f"{'preset':<6} {'ckpt MB':>8} {'tower MB':>8} {'export s':>9} {'peer s':>7} {'ratio':>6} "
        f"{'export cpu-s':>12} {'peer cpu-s':>10} "
        f"{'peak MB':>8} {'runtime MB':>10} {'(peak-rt)/ckpt':>14} {'max diff':>9}"
    )
    print(head)
    for preset, weights_mb, exp, peer in rows:
        print(
            f"{preset:<6} {weights_mb:8.0f} {exp['vision_bytes'] / 2**20:8.0f} {exp['wall']:9.1f} "
            f"{peer['wall']:7.1f} {exp['wall'] / peer['wall']:5.2f}x {exp['cpu']:12.1f} {peer['cpu']:10.1f} "
            f"{exp['peak_mb']:8.0f} "
            f"{exp['base_mb']:10.0f} {(exp['peak_mb'] - exp['base_mb']) / weights_mb:13.2f}x "
            f"{exp['max_diff']:9.1e}"
        )
    print()
    for preset, _, exp, peer in rows:
        split = ", ".join(f"{k} {v:.1f}" for k, v in exp["seconds"].items())
        print(f"{preset} export split (s): {split}; peer peak {peer['peak_mb']:.0f} MB")
    print(
        textwrap.dedent("""
        peer = transformers CLIPVisionModel of the same shape: random init + save_pretrained +
        from_pretrained + one forward on 4 images. ratio = export / peer wall time.
        cpu-s = user + system CPU seconds of that process (what load from other jobs does not
        inflate; on an idle 2-core box wall ~ cpu-s / 2 where both cores are busy).""")
    )


if __name__ == "__main__":
    main()
