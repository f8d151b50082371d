"""Where a labelling run's time goes: wall and thread-CPU seconds per named stage, per thread.

The overhead target ("pipeline overhead outside model calls at most 10%") is read from these
clocks rather than estimated. Each thread keeps its own `StageClock` (the main thread's stages add up
to the run's wall time; the loader's run in parallel and show how much work was moved off the
critical path). Thread CPU time (`time.thread_time`) is reported next to wall time because the
development machine is shared: wall time there measures the neighbours as much as the code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageClock:
    """Seconds per stage for one thread; `with clock("decode"): ...` adds to stage "decode"."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - w0
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.thread_time() - c0

    def add(self, other: StageClock) -> None:
        for mine, theirs in ((self.wall, other.wall), (self.cpu, other.cpu)):
            for stage, s in theirs.items():
                mine[stage] = mine.get(stage, 0.0) + s

    def rounded(self, ndigits: int = 4) -> dict[str, dict[str, float]]:
        """`{stage: {"wall": s, "cpu": s}}`, for stats files and the benchmark."""
        return {
            k: {"wall": round(v, ndigits), "cpu": round(self.cpu.get(k, 0.0), ndigits)}
            for k, v in self.wall.items()
        }
