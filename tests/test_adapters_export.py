"""Export of a JAX checkpoint to a Hugging Face CLIP folder: files, parity, refusals, drop-in use."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from micro import save_random_checkpoint  # noqa: E402

from clocmllm.adapters import export as export_mod  # noqa: E402
from clocmllm.adapters import parity  # noqa: E402
from clocmllm.adapters.export import ParityError, export_encoder  # noqa: E402
from clocmllm.adapters.hf_config import ExportError  # noqa: E402


def _tiny_cfg():
    from clocmllm.encoder.config import load_model_config

    return load_model_config("tiny", {"image_size": 32, "context_length": 8, "vocab_size": 64})


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random checkpoint (with a tokenizer.json named in its config)."""
    cfg = _tiny_cfg()
    root = tmp_path_factory.mktemp("export")
    params = save_random_checkpoint(root, cfg, step=3)
    return root, cfg, params


@pytest.fixture(scope="module")
def exported(tiny_ckpt):
    root, cfg, params = tiny_ckpt
    out = root / "hf"
    report = export_encoder(root / "wd", out, text=True, verbose=False)
    return out, report


@pytest.fixture(scope="module")
def jax_ref(tiny_ckpt):
    """JAX outputs on one random image and the astronaut, for the drop-in tests."""
    _, cfg, params = tiny_ckpt
    inputs = parity.parity_inputs(cfg.image_size, cfg.embed_dim, real=("astronaut",))
    return inputs, parity.jax_outputs(cfg, params, inputs)


def test_folder_files_and_report(exported, tiny_ckpt):
    out, report = exported
    _, cfg, _ = tiny_ckpt
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "prompter.safetensors",
        "prompter_config.json",
        "export_report.json",
        "text/config.json",
        "text/model.safetensors",
        "text/tokenizer.json",
    }
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["CLIPVisionModel"] and config["model_type"] == "clip_vision_model"
    assert (config["hidden_size"], config["num_hidden_layers"], config["image_size"]) == (
        cfg.vision_width,
        cfg.vision_layers,
        cfg.image_size,
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert keys and all(k.startswith("vision_model.") for k in keys)
    on_disk = export_mod.read_report(out)
    assert on_disk["parity"]["ok"] and on_disk == json.loads(json.dumps(report))
    diffs = on_disk["parity"]["diffs"]
    assert {"last_hidden_state", "hidden_states[-2]", "image_embeds", "region_emb", "text_embeds"} <= set(
        diffs
    )
    assert max(diffs.values()) <= 1e-4
    assert on_disk["files"]["model.safetensors"]["bytes"] == (out / "model.safetensors").stat().st_size
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".hf.tmp")]


def test_strict_load_transformers5_and_processor(exported, caplog):
    import torch
    from safetensors.numpy import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    out, report = exported
    hf_logging.enable_propagation()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, info = CLIPVisionModel.from_pretrained(str(out), output_loading_info=True)
    records = list(caplog.records)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING and "transformers" in r.name]
    assert warnings == []
    state = model.state_dict()  # transformers 5 names it without the `vision_model.` prefix
    file = load_file(str(out / "model.safetensors"))
    assert len(file) == len(state)
    for key, value in file.items():
        assert torch.equal(state[key.removeprefix("vision_model.")], torch.from_numpy(value)), key
    proc = CLIPImageProcessor.from_pretrained(str(out))
    size = report["model"]["image_size"]
    assert proc.crop_size == {"height": size, "width": size}
    from clocmllm.encoder.preprocess import CLIP_MEAN

    assert np.allclose(proc.image_mean, CLIP_MEAN)
    from PIL import Image

    pixels = proc(images=Image.new("RGB", (50, 40), (10, 200, 30)), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, size, size)


def test_llava_tower_reads_jax_patch_tokens(exported, tiny_ckpt, jax_ref):
    """The folder as LLaVA's vision_config + tower weights; hidden_states[-2][:, 1:] == JAX."""
    import torch
    from safetensors.torch import load_file
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    out, _ = exported
    _, cfg, params = tiny_ckpt
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    llava_cfg = LlavaConfig(
        vision_config=CLIPVisionConfig.from_pretrained(str(out)),
        text_config=text,
        image_token_index=63,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    llava = LlavaForConditionalGeneration(llava_cfg).eval()
    tower = llava.model.vision_tower
    # the folder's weights, strictly, into the tower LLaVA built from the folder's config
    loaded = CLIPVisionModel.from_pretrained(str(out))
    missing, unexpected = tower.load_state_dict(loaded.state_dict(), strict=True)
    assert not missing and not unexpected
    tower_state = tower.state_dict()
    for key, value in load_file(str(out / "model.safetensors")).items():
        assert torch.equal(tower_state[key.removeprefix("vision_model.")], value), key
    inputs, ref = jax_ref
    with torch.no_grad():
        pixels = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2)
        states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    patches = states[llava_cfg.vision_feature_layer][:, 1:].numpy()
    assert patches.shape == (2, cfg.num_patches, cfg.vision_width)
    assert parity.max_diff(patches, ref["hidden_states[-2]"][:, 1:]) <= 1e-4
    # a different image gives different tokens: the comparison is not vacuous
    assert parity.max_diff(patches[:1], ref["hidden_states[-2]"][1:, 1:]) > 1e-2


def test_refuses_unexportable_and_leaves_nothing(tiny_ckpt, tmp_path):
    from clocmllm.encoder.checkpoints import save_params

    _, cfg, params = tiny_ckpt
    for change, reason in (
        ({"class_token": False}, "class_token"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"patch_size": [8, 4]}, "square patches"),
    ):
        wd = tmp_path / f"wd_{next(iter(change))}"
        save_params(wd, {"model": {**cfg.to_dict(), **change}}, params, 1)
        with pytest.raises(ExportError, match=reason):
            export_encoder(wd, tmp_path / "out", verbose=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in tmp_path.glob("wd_*"))


def test_existing_out_force_and_injected_parity_failure(tiny_ckpt, tmp_path, monkeypatch):
    root, _, _ = tiny_ckpt
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        export_encoder(root / "wd", out, verbose=False)

    # corrupt one weight after writing: the parity check must catch it, and --force must not
    # have replaced the old folder
    real_write = export_mod.write_folder

    def corrupting_write(tmp, *args, **kwargs):
        notes = real_write(tmp, *args, **kwargs)
        from safetensors.numpy import load_file, save_file

        state = load_file(str(tmp / "model.safetensors"))
        key = "vision_model.encoder.layers.1.mlp.fc2.bias"
        state[key] = state[key] + 1e-2
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return notes

    monkeypatch.setattr(export_mod, "write_folder", corrupting_write)
    with pytest.raises(ParityError, match="last_hidden_state"):
        export_encoder(root / "wd", out, force=True, verbose=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]

    monkeypatch.setattr(export_mod, "write_folder", real_write)
    export_encoder(root / "wd", out, force=True, verbose=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


COMPAT_SCRIPT = r"""
import logging, sys
import numpy as np, torch, transformers
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection, CLIPVisionModel

folder, images_path, out_path = sys.argv[1:4]
records = []
handler = logging.Handler()
handler.emit = records.append
transformers.logging.set_verbosity_warning()
transformers.logging.get_logger().addHandler(handler)
model, info = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)
problems = {k: v for k, v in info.items() if v}
assert not problems, problems
warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
assert not warnings, warnings
state = model.state_dict()
file = load_file(folder + "/model.safetensors")
assert set(file) == set(state), set(file) ^ set(state)
for key, value in file.items():
    assert torch.equal(state[key], value), key
text, info = CLIPTextModelWithProjection.from_pretrained(folder + "/text", output_loading_info=True)
assert not {k: v for k, v in info.items() if v}, info
text_file = load_file(folder + "/text/model.safetensors")
assert set(text_file) == set(text.state_dict()) - {"text_model.embeddings.position_ids"}
warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
assert not warnings, warnings
pixels = torch.from_numpy(np.load(images_path)).permute(0, 3, 1, 2).contiguous()
with torch.no_grad():
    states = model.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states
np.save(out_path, states[-2].numpy())
print(transformers.__version__, len(file))
"""


@pytest.mark.compat
def test_strict_load_transformers_4_37_2(exported, jax_ref, tmp_path):
    """LLaVA-1.5's pinned transformers loads the folder (and text/) strictly, silently, with our
    weights, and its tower gives the JAX model's hidden_states[-2]."""
    from compat_env import run_compat

    out, _ = exported
    inputs, ref = jax_ref
    np.save(tmp_path / "images.npy", inputs["images"])
    proc = run_compat(COMPAT_SCRIPT, str(out), str(tmp_path / "images.npy"), str(tmp_path / "h.npy"))
    version, n_tensors = proc.stdout.split()[-2:]
    assert version == "4.37.2" and int(n_tensors) > 0
    assert parity.max_diff(np.load(tmp_path / "h.npy"), ref["hidden_states[-2]"]) <= 1e-4
