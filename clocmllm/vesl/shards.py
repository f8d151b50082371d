"""The output layout of a labelling run, and what makes a shard "finished".

    OUT/plan.json                 source, item count, shard size (the same for every process)
    OUT/shard-00000.jsonl         region-text records (clocmllm.data.regions format)
    OUT/shard-00000.stats.json    written last: its presence is the done marker
    OUT/images/shard-00000/...    only for dataset images that have no file on disk
    OUT/metrics-0-of-1.jsonl      one line per shard finished by process 0 of 1

Both shard files are written to a temp name and renamed, the JSONL first and the stats last, so a
crash or kill at any moment leaves either a finished shard or one without stats, which a rerun
redoes. Shard `k` holds items `[k*S, (k+1)*S)`; process `i` of `n` takes the shards with
`k % n == i` (round robin: the deterministic split that balances a tail of short shards best).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShardPlan:
    total_items: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return (self.total_items + self.shard_size - 1) // self.shard_size

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.total_items)

    def mine(self, shard_index: int, num_shards: int) -> list[int]:
        """The shards process `shard_index` of `num_shards` is responsible for."""
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index} and {num_shards}")
        return [k for k in range(self.num_shards) if k % num_shards == shard_index]


def shard_paths(out: Path, k: int) -> tuple[Path, Path]:
    return out / f"shard-{k:05d}.jsonl", out / f"shard-{k:05d}.stats.json"


def is_done(out: Path, k: int) -> bool:
    records, stats = shard_paths(out, k)
    return stats.is_file() and records.is_file()


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_plan(out: Path, plan: ShardPlan, description: str) -> None:
    """Write plan.json on the first run; on a rerun, refuse a different split of the same folder
    (mixing shard sizes or inputs would silently duplicate or drop images)."""
    path = out / "plan.json"
    want = {"source": description, "total_items": plan.total_items, "shard_size": plan.shard_size}
    if path.is_file():
        have = json.loads(path.read_text(encoding="utf-8"))
        if {k: have.get(k) for k in want} != want:
            raise ValueError(
                f"{path}: this output folder was planned as {have}, but this run asks for {want}. "
                "Use a new --out folder or the same inputs and --shard-size."
            )
        return
    write_json_atomic(path, want)
