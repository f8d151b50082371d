"""The micro encoder used by the JAX tests: one layer per tower, width 32 (compiles in seconds)."""

from __future__ import annotations

MICRO_MODEL = {
    "image_size": 32,
    "patch_size": 8,
    "vision_width": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "vision_mlp_dim": 64,
    "text_width": 32,
    "text_layers": 1,
    "text_heads": 2,
    "text_mlp_dim": 64,
    "embed_dim": 32,
    "context_length": 12,
    "prompter_freqs": 4,
}


def micro_model(**overrides) -> dict:
    """MICRO_MODEL with some fields changed (a fresh dict each call)."""
    return {**MICRO_MODEL, **overrides}


def jax_cli_env(xla_flags: str = "") -> dict[str, str]:
    """Environment for JAX subprocesses of the tests (`clocmllm pretrain`, scripts).

    A persistent compile cache shared across tests and runs (its keys include flags and
    versions), so the micro step compiles once per machine; LLVM -O0, which compiles the
    micro model's step ~40% faster with the same numerics.
    """
    import os
    import tempfile
    from pathlib import Path

    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(Path(tempfile.gettempdir()) / "clocmllm-test-jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{xla_flags} --xla_backend_optimization_level=0".strip(),
    }


def save_random_checkpoint(root, cfg, step: int = 1):
    """A random-init checkpoint of `cfg` (a ModelConfig) at `root/wd`, with a two-word
    tokenizer named in its config: what `clocmllm export` needs. Returns the params."""
    import jax
    import numpy as np
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from clocmllm.encoder.checkpoints import save_params
    from clocmllm.encoder.models.clip import CLIP

    model = CLIP(cfg)
    params = jax.jit(lambda r: model.init(r, *model.dummy_inputs(1))["params"])(jax.random.key(0))
    params = jax.tree.map(np.asarray, params)
    Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(root / "tokenizer.json"))
    save_params(
        root / "wd", {"model": cfg.to_dict(), "tokenizer": str(root / "tokenizer.json")}, params, step
    )
    return params
