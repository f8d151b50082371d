"""Hugging Face CLIP -> JAX import, and HF -> JAX -> HF round trips (bit-identical weights)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clocmllm.adapters import hf_config, names  # noqa: E402


def _fill(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Distinct pseudo-random float32 content per tensor, cheap even for 300M parameters:
    windows at different offsets of one random pool (a swapped q/k or a missing transpose
    then shows up as a mismatch)."""
    pool = np.random.default_rng(seed).standard_normal(1_000_003).astype(np.float32)
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        size = int(np.prod(shape))
        start = (i * 7919) % 1_000_000
        out[name] = np.resize(pool[start:], size).reshape(shape)
    return out


def _hf_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    """State dict shapes of a transformers model built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("preset", ["b16", "l14"])
def test_name_tables_round_trip_at_real_shapes(preset):
    """B/16 (both towers) and L/14 (vision only): every HF tensor maps onto exactly the JAX
    param of the right shape at full depth (meta tensors / eval_shape: no memory), and real
    values go HF -> JAX -> HF bit for bit at full width (2 layers: the per-layer rules are
    the same for every layer, and 300M floats would cost seconds of copying)."""
    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.models.clip import param_shapes

    for layers in (None, 2):
        overrides = {} if layers is None else {"vision_layers": layers, "text_layers": layers}
        cfg = load_model_config(preset, overrides)
        shapes, rules = _hf_layout(cfg, text=preset == "b16")
        assert sorted(names.torch_names(rules)) == sorted(shapes)
        jax_shapes = _jax_shapes(param_shapes(cfg))
        if layers is None:
            for rule in rules:  # shapes only, through the same layout rules
                fake = {
                    n: np.lib.stride_tricks.as_strided(
                        np.zeros(1, np.float32), shapes[n], [0] * len(shapes[n])
                    )
                    for n in rule.torch
                }
                assert names.torch_to_jax(fake, [rule])[rule.jax].shape == jax_shapes[rule.jax], rule.jax
            continue
        state = _fill(shapes)
        flat = names.torch_to_jax(state, rules)
        for path, value in flat.items():
            assert value.shape == jax_shapes[path], path
        back = names.jax_to_torch(flat, rules)
        assert set(back) == set(state)
        for key, value in state.items():
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def _hf_layout(cfg, text: bool):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    if text:
        hf_cfg = CLIPConfig(
            vision_config=hf_config.vision_config(cfg),
            text_config=hf_config.text_config(cfg),
            projection_dim=cfg.embed_dim,
        )
        shapes = _hf_shapes(CLIPModel, hf_cfg)
        shapes.pop("logit_scale")
        return shapes, names.vision_rules(cfg.vision_layers, projection=True) + names.text_rules(
            cfg.text_layers
        )
    shapes = _hf_shapes(CLIPVisionModel, CLIPVisionConfig(**hf_config.vision_config(cfg)))
    # transformers 5 names a CLIPVisionModel's tensors without `vision_model.`; we write it
    shapes = {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in shapes.items()}
    return shapes, names.vision_rules(cfg.vision_layers)


def _jax_shapes(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        out.update(_jax_shapes(value, path) if isinstance(value, dict) else {path: tuple(value.shape)})
    return out


def _tiny_hf_clip(folder, seed: int = 0):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
        hidden_act="quick_gelu",
    )
    text = dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=8,
        eos_token_id=49,
        pad_token_id=0,
        bos_token_id=48,
        projection_dim=16,
    )
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial layer norms and biases too
            p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True)
    model.config.to_json_file(str(folder / "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return model, state


def test_import_then_export_is_bit_identical(tmp_path, capsys):
    """CLI round trip: HF CLIPModel -> import-clip -> export --full-clip -> the same tensors."""
    from safetensors.numpy import load_file

    from clocmllm.cli import main
    from clocmllm.encoder.checkpoints import restore_params

    _, state = _tiny_hf_clip(tmp_path / "hf")
    assert main(["import-clip", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "wd")]) == 0
    said = capsys.readouterr().out
    assert "initialised fresh" in said and "prompter" in said and "text (whole tower)" not in said
    config, params, step = restore_params(tmp_path / "wd")
    assert step == 0 and config["model"]["vision_width"] == 32 and config["model"]["eot_token_id"] == 49
    assert np.array_equal(
        params["visual"]["class_embedding"], state["vision_model.embeddings.class_embedding"].numpy()
    )

    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "wd" / "checkpoints" / "0"),
                "--out",
                str(tmp_path / "out"),
                "--full-clip",
            ]
        )
        == 0
    )
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == set(state)
    for key, value in state.items():
        assert np.array_equal(back[key], value.numpy()), key
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["kind"] == "CLIPModel" and max(report["parity"]["diffs"].values()) <= 1e-4
    # exporting again without --force is refused and says how to proceed
    assert main(["export", "--checkpoint", str(tmp_path / "wd"), "--out", str(tmp_path / "out")]) == 1
    assert "--force" in capsys.readouterr().err


def test_import_vision_only_saved_by_transformers5(tmp_path, capsys):
    """`save_pretrained` of transformers 5 drops `vision_model.`; import puts it back."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from clocmllm.adapters.import_clip import ImportClipError, import_clip
    from clocmllm.encoder.checkpoints import restore_params

    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            hidden_act="gelu",
        )
    )
    vision.save_pretrained(str(tmp_path / "hf"))
    small_text = dict(
        text_width=16, text_layers=1, text_heads=2, text_mlp_dim=32, vocab_size=40, context_length=8
    )
    with pytest.raises(ImportClipError, match="vision_width"):
        import_clip(tmp_path / "hf", tmp_path / "wd", overrides={"vision_width": 64})
    report = import_clip(tmp_path / "hf", tmp_path / "wd", overrides={**small_text, "eot_token_id": 39})
    assert report["towers"] == ["vision"] and "text (whole tower)" in report["initialised_fresh"]
    assert "visual/proj" in report["initialised_fresh"]
    config, params, _ = restore_params(tmp_path / "wd")
    assert config["model"]["hidden_act"] == "gelu" and config["model"]["vision_layers"] == 1
    assert config["model"]["text_layers"] == 1 and params["text"]["token_embed"]["embedding"].shape == (
        40,
        16,
    )
    fc1 = vision.state_dict()["encoder.layers.0.mlp.fc1.weight"]  # transformers 5 names
    assert np.array_equal(params["visual"]["layer_0"]["mlp"]["fc1"]["kernel"], fc1.numpy().T)


def test_legacy_eos_id_2_imports_as_the_end_of_text_id(tmp_path):
    """The OpenAI folders on the Hub say eos_token_id 2, with which HF pools at the highest id
    of the row (CLIP BPE's end-of-text). The import must pool at that id too: the JAX text
    embedding equals HF's on a row whose end-of-text (49, the last id) is followed by pads."""
    import jax
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    from clocmllm.adapters.import_clip import import_clip
    from clocmllm.encoder.checkpoints import restore_params
    from clocmllm.encoder.config import ModelConfig
    from clocmllm.encoder.models.clip import CLIP

    _, state = _tiny_hf_clip(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 2
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    import_clip(hf, tmp_path / "wd", verbose=False)
    config, params, _ = restore_params(tmp_path / "wd")
    assert config["model"]["eot_token_id"] == 49
    ids = np.array([[48, 5, 7, 49, 2, 2, 0, 0], [48, 9, 49, 0, 0, 0, 0, 0]], np.int32)  # 2s after EOT
    ours = CLIP(ModelConfig.from_dict(config["model"])).apply({"params": params}, ids, method="encode_text")
    legacy = CLIPModel(CLIPConfig(**cfg)).eval()
    legacy.load_state_dict(state, strict=False)
    with torch.no_grad():
        theirs = legacy.get_text_features(input_ids=torch.from_numpy(ids).long())
    theirs = getattr(theirs, "pooler_output", theirs)  # transformers 5 may return an output object
    np.testing.assert_allclose(np.asarray(jax.device_get(ours)), theirs.numpy(), atol=1e-5)


def test_import_refuses_pickles_and_bad_config(tmp_path):
    from clocmllm.adapters.import_clip import ImportClipError, import_clip

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "clip_vision_model",\n "hidden_size": }')
    with pytest.raises(ImportClipError, match=r"config.json: line 2"):
        import_clip(folder, tmp_path / "wd")
    good = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    (folder / "config.json").write_text(json.dumps(good))
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ImportClipError, match="refusing to unpickle"):
        import_clip(folder, tmp_path / "wd")
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(ImportClipError, match="siglip_vision_model"):
        import_clip(folder, tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_streaming_safetensors_writer(tmp_path):
    """Strided views, 0-d scalars and ints survive the writer; safetensors reads it back."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from clocmllm.adapters.folder_io import write_safetensors

    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"t": base.T, "s": np.asarray(2.5, np.float32), "i": np.arange(3), "q": base[:, 2:4]}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype
        assert np.array_equal(back[key], value), key
    with safe_open(str(tmp_path / "x.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
