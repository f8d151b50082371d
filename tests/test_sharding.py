"""Sharding: the FSDP spec rule, and 8 simulated CPU devices (data x fsdp = 4 x 2) giving the
same loss and update as one device for the same global batch (subprocess, XLA host devices)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from micro import jax_cli_env

SCRIPT = textwrap.dedent(
    """
    import json, jax, numpy as np
    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.models.clip import CLIP
    from clocmllm.encoder.optimizer import build_optimizer
    from clocmllm.encoder.sharding import make_mesh, tree_shardings, shard_batch, batch_sharding
    from clocmllm.encoder.trainer import DEFAULTS, abstract_state, deep_merge, make_train_step

    assert jax.device_count() == 8, jax.devices()
    micro = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                 vision_mlp_dim=64, text_width=32, text_layers=1, text_heads=2, text_mlp_dim=64,
                 embed_dim=32, context_length=12, prompter_freqs=4)
    model = CLIP(load_model_config("tiny", micro))
    cfg = deep_merge(DEFAULTS, {"mode": "cloc", "optim": {"lr": 1e-3, "warmup_steps": 0}})
    tx, sched = build_optimizer(cfg["optim"], 10)
    rng = np.random.default_rng(0)
    B, M, T = 16, 2, 12
    valid = rng.random((B, M)) < 0.7
    text = rng.integers(4, 500, (B, T)).astype(np.int32); text[:, 5] = 3
    rtext = rng.integers(4, 500, (B, M, T)).astype(np.int32); rtext[..., 0] = 1; rtext[..., 3] = 3
    x1 = rng.random((B, M, 2)) * 0.5
    batch = {"images": rng.normal(size=(B, 32, 32, 3)).astype(np.float32), "text": text,
             "region_boxes": np.concatenate([x1, x1 + 0.3], -1).astype(np.float32),
             "region_valid": valid, "region_text": rtext}
    # the trainer's phrase packing (rows a multiple of the device count), sharded like the rest
    from clocmllm.encoder.text_packing import pack_region_phrases
    packed = pack_region_phrases(batch, 3, align=8)
    assert "region_pack_sot" in packed and len(packed["region_pack_tokens"]) % 8 == 0
    out = {}
    for name, devices, mesh_cfg, b in (("one", jax.devices()[:1], {"data": 1, "fsdp": 1}, batch),
                                       ("eight", jax.devices(), {"data": 4, "fsdp": 2}, batch),
                                       ("eight_packed", jax.devices(), {"data": 4, "fsdp": 2}, packed)):
        mesh = make_mesh(mesh_cfg, devices)
        abstract, init = abstract_state(model, tx, 0)
        sh = tree_shardings(abstract, mesh, min_size=64)
        state = jax.jit(init, out_shardings=sh)()
        step = jax.jit(make_train_step(model, tx, sched, cfg), in_shardings=(sh, batch_sharding(mesh)),
                       out_shardings=(sh, None))
        new, metrics = step(state, shard_batch(b, mesh))
        first = [np.asarray(p).tolist() for p in jax.tree.leaves(new.params)]
        new, metrics2 = step(new, shard_batch(b, mesh))
        kernel = new.params["visual"]["layer_0"]["mlp"]["fc1"]["kernel"]
        out[name] = {"loss": [float(metrics["loss"]), float(metrics2["loss"])],
                     "params": first + [np.asarray(p).tolist() for p in jax.tree.leaves(new.params)],
                     "sharded": str(kernel.sharding.spec), "n_shards": len(kernel.addressable_shards)}
    # init_from on the sharded mesh: the source's values land on the run's own shardings
    import tempfile
    from clocmllm.encoder.checkpoints import save_params
    from clocmllm.encoder.warm_start import warm_start_params
    src = jax.jit(lambda r: model.init(r, *model.dummy_inputs(1))["params"])(jax.random.key(7))
    with tempfile.TemporaryDirectory() as d:
        save_params(d, {"model": model.config.to_dict()}, src, 0)
        mesh = make_mesh({"data": 4, "fsdp": 2}, jax.devices())
        abstract, init = abstract_state(model, tx, 0)
        state = jax.jit(init, out_shardings=tree_shardings(abstract, mesh, min_size=64))()
        warm, report = warm_start_params(state.params, d, model.config.to_dict())
    pairs = list(zip(jax.tree.leaves(warm), jax.tree.leaves(src), jax.tree.leaves(state.params), strict=True))
    out["warm"] = {"equal": all(np.array_equal(np.asarray(w), np.asarray(s)) for w, s, _ in pairs),
                   "same_sharding": all(w.sharding == i.sharding for w, _, i in pairs),
                   "copied": report["copied"], "leaves": len(pairs),
                   "n_shards": len(warm["visual"]["layer_0"]["mlp"]["fc1"]["kernel"].addressable_shards)}
    print("RESULT" + json.dumps(out))
    """
)


def test_fsdp_spec_rule():
    from jax.sharding import PartitionSpec as P

    from clocmllm.encoder.sharding import fsdp_spec

    assert fsdp_spec((64, 256), 2, min_size=16) == P(None, "fsdp")  # largest divisible dim
    assert fsdp_spec((256, 63), 2, min_size=16) == P("fsdp", None)
    assert fsdp_spec((63, 33), 2, min_size=16) == P()  # nothing divisible: replicated
    assert fsdp_spec((8,), 2, min_size=16) == P()  # too small to bother
    assert fsdp_spec((64, 256), 1) == P()


def test_make_mesh_sizes():
    import jax

    from clocmllm.encoder.sharding import make_mesh

    mesh = make_mesh({"data": -1, "fsdp": 1})
    assert mesh.axis_names == ("data", "fsdp") and mesh.shape["data"] == jax.device_count()
    with pytest.raises(ValueError, match="does not match"):
        make_mesh({"data": 3, "fsdp": 5})


def test_eight_devices_match_one_device():
    env = jax_cli_env("--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6 :])
    one = res["one"]
    import numpy as np

    # eight devices, and eight devices with the phrases packed (encoder/text_packing.py)
    for eight in (res["eight"], res["eight_packed"]):
        assert eight["n_shards"] == 8 and "fsdp" in eight["sharded"]  # really sharded over fsdp
        for a, b in zip(one["loss"], eight["loss"], strict=True):
            assert abs(a - b) < 1e-5, (one["loss"], eight["loss"])
        # parameters after the first and after the second update agree
        for a, b in zip(one["params"], eight["params"], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    assert one["loss"][1] != one["loss"][0]  # the update did something
    warm = res["warm"]  # init_from onto fsdp-sharded params (encoder/warm_start.py)
    assert warm["equal"] and warm["same_sharding"] and warm["n_shards"] == 8
    assert warm["copied"] == warm["leaves"]
