"""glibc malloc settings that stop XLA CPU from page-faulting its temp buffer in every step.

Why: XLA CPU allocates each execution's temporaries as one buffer (102 MB for the `tiny`
CLIP step at batch 64, GBs at ViT-S/16) and frees it at the end; with JAX's asynchronous
dispatch a worker thread takes it.
glibc serves a request that large from a thread's own arena with a fresh `mmap` (a
non-main arena cannot grow past 64 MB, and the dynamic mmap threshold stops at 32 MB), and
`free` unmaps it: every step then faults ~25k zeroed pages back in. Measured at `tiny`,
single-threaded: 38 ms of the 137 ms step was kernel time (25k minor faults a step);
with the settings below, 0 faults and 114-117 ms (docs/benchmarks.md, "where the CPU time
goes"). PyTorch's eager step gains too (7.6k faults, 113 -> 101 ms), so the benchmark applies
the same settings to both sides.

The settings: no mmap for large blocks (`M_MMAP_MAX=0`, they come from the main heap and are
reused), and no trimming of the heap top (`M_TRIM_THRESHOLD=-1`; a 1 GiB threshold still let
the >1 GiB temp buffer of a ViT-S/16 step at batch 32 be trimmed and re-faulted every step:
793k faults, 1.5 s of sys time a step). Call `reuse_freed_memory()` before JAX creates its
CPU client (first device use). Cost: freed memory stays in the process.
CLOCMLLM_MALLOC_TUNING=0 leaves malloc alone.

Until session 10 the settings also capped glibc at one arena (`M_ARENA_MAX=1`), so that a
worker thread's temp buffer came from the main heap too. With the synchronous client below
the buffer is taken by the calling thread, which already allocates from the main heap, and
the one arena made every thread's malloc share one lock. That cost most where several
threads run: the `tiny` CLOC trainer on 2 cores (2k world, 300 steps) took 67.0 s with it,
43.6 s without it, as long as on glibc's defaults (43.8 s;
`scripts/bench/bench_trainer_malloc.py`); ViT-S/16 CLIP step on 2 threads 5060 -> 4513 ms;
one pinned thread: `tiny` 52.6 -> 48.0 ms, ViT-S/16 8403 -> 8112 ms (docs/benchmarks.md,
item 11).

The settings need a synchronous CPU client too (`synchronous_cpu_client`). With JAX's async
dispatch a step's outputs are ready before its temp buffer is freed, so the next step can
ask for its buffer while the last one is still held: the heap then grows by a whole temp
buffer, which stays. Measured at ViT-S/16, batch 32 (3.3 GB temp buffer), 10-14 steps a run:
3 of 4 async runs grew from 4.8 to 8.1 GB at step 3 or 4 (one whole re-fault, 11 s of sys
time); 3 of 3 synchronous runs stayed at 4.8 GB with 0 faults after step 0. That growth
(up to 11.3 GB in an earlier, unpinned run) was why the trainer once tuned small steps only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_done = False


def reuse_freed_memory() -> bool:
    """Apply the settings above once per process; True when glibc accepted all three."""
    global _done
    if _done:
        return True
    if os.environ.get("CLOCMLLM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    _done = ok
    return ok


def synchronous_cpu_client() -> None:
    """Have JAX's CPU client run each computation inline (`jax_cpu_enable_async_dispatch`).

    Then a step returns after its temp buffer is freed, and the next one reuses it in place
    (module docstring). Read when the client is created, so call this before the first device
    use; it is a no-op for a client that already exists. Costs nothing in `train()`, which
    waits for each step's metrics anyway; multi-device computations are not affected.
    """
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def jax_will_run_on_cpu(platforms: str | None = None) -> bool:
    """Whether JAX's default backend will be the CPU, judged without starting it (the malloc
    settings must precede the client): the first of `jax_platforms` / JAX_PLATFORMS when
    set, else whether no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    if platforms is None:
        jax = sys.modules.get("jax")  # not imported here: a PyTorch process (the bench) asks too
        platforms = (jax.config.jax_platforms if jax is not None else None) or os.environ.get(
            "JAX_PLATFORMS", ""
        )
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    plugins = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins

        plugins += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    return not plugins and importlib.util.find_spec("libtpu") is None
