"""FSDP sharding rule for the CLOC param tree: a function of (shape, mesh axis size).

We keep params as plain dicts (no `nn.with_logical_partitioning` boxes), so the rule is
applied from outside: shard each large parameter along its largest dimension that the
`fsdp` axis size divides; replicate small ones (layernorms, biases, scalars) where the
all-gather would cost more than the memory saved. Works on arrays and on
`jax.eval_shape` outputs alike, so the trainer can build shardings before allocating.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

MIN_SHARDED_ELEMENTS = 2**14


def fsdp_spec(
    shape: tuple[int, ...], fsdp_size: int, axis: str = "fsdp", min_elements: int = MIN_SHARDED_ELEMENTS
) -> PartitionSpec:
    """PartitionSpec for one param: its largest `fsdp_size`-divisible dim on `axis`, else replicated."""
    size = 1
    for dim in shape:
        size *= dim
    if fsdp_size <= 1 or size < min_elements:
        return PartitionSpec()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = axis
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_partition_specs(
    params: Any, fsdp_size: int, axis: str = "fsdp", min_elements: int = MIN_SHARDED_ELEMENTS
) -> Any:
    """Tree of PartitionSpec matching `params` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map(
        lambda leaf: fsdp_spec(tuple(leaf.shape), fsdp_size, axis, min_elements), params
    )
