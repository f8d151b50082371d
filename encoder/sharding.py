"""Device mesh and shardings: data parallel over `data`, FSDP over `fsdp`.

Mesh axes are `('data', 'fsdp')`, sized from the config (`mesh: {data: -1, fsdp: 1}`; -1
takes the remaining devices). The batch is split over both axes (every device sees distinct
examples). Parameters and optimizer state are sharded over `fsdp` by the *largest divisible
dimension* rule: each array is split along its largest dimension that the fsdp size divides
(ties: the last such dim); arrays with none (scalars, small vectors) are replicated. XLA's
SPMD partitioner then inserts the all-gathers/reduce-scatters. This needs no per-module
annotations, so the model code stays free of sharding concerns; arrays smaller than
`min_size` elements are replicated, since gathering them costs more than it saves.

Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize()` when the
config asks for it and the usual coordinator variables are present.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_SPEC = PartitionSpec(AXES)

_MULTIHOST_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
)


def maybe_initialize_distributed(enabled: bool) -> bool:
    """`jax.distributed.initialize()` when enabled and a multi-host environment is visible."""
    if not enabled or not any(v in os.environ for v in _MULTIHOST_VARS):
        return False
    jax.distributed.initialize()
    return True


def make_mesh(cfg: Mapping | None = None, devices: list | None = None) -> Mesh:
    """A `('data', 'fsdp')` mesh; one of the sizes may be -1 (all remaining devices)."""
    cfg = dict(cfg or {})
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    data, fsdp = int(cfg.get("data", -1)), int(cfg.get("fsdp", 1))
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data/fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n or data < 1 or fsdp < 1:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not match {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**14) -> PartitionSpec:
    """PartitionSpec for one array under the largest-divisible-dimension rule."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    best = None
    for i, d in enumerate(shape):
        if d % fsdp == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh, min_size: int = 2**14):
    """NamedShardings for every leaf of a pytree of arrays or ShapeDtypeStructs."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Host batch (this process's slice) -> global jax arrays sharded over both mesh axes."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
