"""The training state: step, params, optimizer state and RNG key, as one pytree.

A flax `struct.dataclass` so it passes through `jax.jit` whole and its shardings are a
matching pytree. The RNG key is a raw uint32 key (`jax.random.PRNGKey`), which orbax saves
as a plain array; the model has no dropout (CLOC trains without it) but the key is carried
and checkpointed so stochastic additions stay resumable.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def new_state(params: Any, tx, seed: int) -> TrainState:
    """Fresh state (call under `jax.jit` with out_shardings to build it sharded)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed + 1),
    )
