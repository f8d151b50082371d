"""`init_from`: a new pretrain run starting from imported CLIP weights or an earlier run."""

from __future__ import annotations

import os

import numpy as np
import pytest
from micro import MICRO_MODEL

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_plan_copies_matching_keeps_fresh_and_refuses_a_shape():
    from clocmllm.encoder.warm_start import WarmStartError, plan

    source = {"a/w": np.ones((2, 3)), "b/w": np.ones(4), "p/w": np.ones(5), "extra/w": np.ones(1)}
    target = {"a/w": (2, 3), "b/w": (4,), "p/w": (7,), "new/w": (2,)}
    got = plan(target, source, keep_fresh={"p/w"})
    assert sorted(got.copied) == ["a/w", "b/w"]
    assert got.fresh == ["p/w", "new/w"] and got.unused == ["extra/w"]
    assert got.summary() == {
        "copied": 2,
        "resized": [],
        "fresh": ["new/w (1)", "p/w (1)"],
        "unused": ["extra/w (1)"],
    }
    with pytest.raises(
        WarmStartError, match=r"p/w has shape \(5,\) there, this model wants \(7,\).*width 8 -> 9"
    ):
        plan(target, source, where="init_from X", field_diffs="width 8 -> 9")


def test_position_tables_follow_a_new_image_size_or_a_shorter_context():
    """Another image size: the patch grid's table is resampled (class row kept; a smooth
    table stays smooth, a constant one constant); a shorter text context: the first rows."""
    from clocmllm.encoder.warm_start import WarmStartError, plan

    d = 3
    yy, xx = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    grid = np.stack([np.ones_like(xx), xx, yy], -1).reshape(16, d)  # constant, x ramp, y ramp
    cls = np.array([[7.0, 8.0, 9.0]])
    source = {"visual/pos_embed": np.concatenate([cls, grid]).astype(np.float32),
              "text/pos_embed": np.arange(12.0 * d).reshape(12, d)}  # fmt: skip
    got = plan({"visual/pos_embed": (1 + 36, d), "text/pos_embed": (8, d)}, source)
    vis = got.copied["visual/pos_embed"]
    assert vis.shape == (37, d) and np.array_equal(vis[0], cls[0])
    new = vis[1:].reshape(6, 6, d)
    np.testing.assert_allclose(new[..., 0], 1.0, atol=1e-5)
    assert np.all(np.diff(new[..., 1], axis=1) > 0) and np.all(np.diff(new[..., 2], axis=0) > 0)
    np.testing.assert_allclose(new[..., 1], new[..., 2].T, atol=1e-5)  # x and y treated alike
    assert np.array_equal(got.copied["text/pos_embed"], source["text/pos_embed"][:8])
    assert got.summary()["resized"] == [
        "visual/pos_embed ((17, 3) -> (37, 3))",
        "text/pos_embed ((12, 3) -> (8, 3))",
    ]
    # no class token: the whole table is the grid
    flat = plan({"visual/pos_embed": (9, d)}, {"visual/pos_embed": grid}, class_token=False)
    assert flat.copied["visual/pos_embed"].shape == (9, d)
    # a longer context has no rows to take; a table of another width is not a resize
    with pytest.raises(WarmStartError, match="text/pos_embed"):
        plan({"text/pos_embed": (16, d)}, source)
    with pytest.raises(WarmStartError, match="visual/pos_embed"):
        plan({"visual/pos_embed": (37, d + 1)}, source)


def test_a_model_that_computes_otherwise_is_refused():
    from clocmllm.encoder.warm_start import WarmStartError, check_numerics

    check_numerics({"hidden_act": "gelu"}, {"hidden_act": "gelu", "vision_width": 64}, "here")
    with pytest.raises(WarmStartError, match=r"hidden_act \(quick_gelu there, gelu here\)"):
        check_numerics({"hidden_act": "quick_gelu"}, {"hidden_act": "gelu"}, "init_from X")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A world, a Hugging Face CLIPModel of the micro model's sizes with the world's
    tokenizer in its folder, and that folder imported with `import-clip`."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    from clocmllm.adapters.import_clip import import_clip
    from clocmllm.data.world import generate_world
    from clocmllm.encoder.input_pipeline import load_records
    from clocmllm.encoder.tokenizer import build_word_tokenizer

    root = tmp_path_factory.mktemp("warm")
    generate_world(root / "world", train=16, eval=4, seed=0, image_size=32, progress=False)
    hf = root / "hf"
    hf.mkdir()
    records = load_records(root / "world", "train")
    texts = [r.caption for r in records] + [g.text for r in records for g in r.regions]
    tok = build_word_tokenizer(texts, hf / "tokenizer.json", context_length=MICRO_MODEL["context_length"])
    m = MICRO_MODEL
    vision = dict(hidden_size=m["vision_width"], intermediate_size=m["vision_mlp_dim"], num_hidden_layers=m["vision_layers"],
                  num_attention_heads=m["vision_heads"], image_size=m["image_size"], patch_size=m["patch_size"],
                  projection_dim=m["embed_dim"], hidden_act="quick_gelu")  # fmt: skip
    text = dict(hidden_size=m["text_width"], intermediate_size=m["text_mlp_dim"], num_hidden_layers=m["text_layers"],
                num_attention_heads=m["text_heads"], vocab_size=tok.vocab_size, max_position_embeddings=m["context_length"],
                eos_token_id=3, pad_token_id=0, bos_token_id=2, projection_dim=m["embed_dim"])  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=m["embed_dim"]))
    model.config.to_json_file(str(hf / "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    import_clip(hf, root / "from_clip", verbose=False)
    return root


def recipe(**over) -> dict:
    return {
        "mode": "cloc",
        "steps": 2,
        "seed": 3,
        "progress": False,
        "model": {"preset": "tiny", **MICRO_MODEL},  # prompter_freqs 4, the import's 16
        "data": {"batch_size": 8, "num_regions": 2, "threads": 1},
        # 2 steps: the warm-up is cut to 1 step, whose lr is 0: checkpoint 1 holds the start
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "checkpoint": {"every": 1, "keep": 2},
        "eval": {"at_end": False},
        **over,
    }


def test_pretrain_from_imported_clip_weights(imported):
    """The towers start as the Hugging Face weights, the prompter as this run's own init
    (its shapes differ from the import's placeholder), with the source's tokenizer; a second
    call resumes the run instead of starting it again."""
    from clocmllm.encoder.checkpoints import restore_params
    from clocmllm.encoder.trainer import resolve_config, train
    from clocmllm.encoder.warm_start import flatten

    root = imported
    src_cfg, src, _ = restore_params(root / "from_clip")
    cfg = resolve_config(recipe(init_from=str(root / "from_clip")), data=root / "world")
    out = train(cfg, root / "run")
    assert out["warm_start"]["copied"] > 0 and out["resumed_from"] == 0
    assert any(g.startswith("prompter/") for g in out["warm_start"]["fresh"])
    run_cfg, got, step = restore_params(root / "run" / "checkpoints" / "1")
    assert step == 1 and restore_params(root / "run")[2] == 2
    assert (root / "run" / "tokenizer.json").read_bytes() == (root / "hf" / "tokenizer.json").read_bytes()
    src, got = flatten(src), flatten(got)
    towers = [p for p in got if p.split("/")[0] in ("visual", "text")]
    assert len(towers) > 20
    for p in towers:
        np.testing.assert_array_equal(got[p], src[p], err_msg=p)
    # the placeholders are the run's own init (its seed, its prompter_freqs), not the import's
    import jax

    from clocmllm.encoder.config import ModelConfig
    from clocmllm.encoder.models.clip import CLIP

    model = CLIP(ModelConfig.from_dict(run_cfg["model"]))
    own = flatten(jax.jit(lambda: model.init(jax.random.PRNGKey(3), *model.dummy_inputs(1))["params"])())
    placeholders = [p for p in got if p.split("/")[0] in ("prompter", "ground")]
    assert placeholders and any(own[p].shape != src[p].shape for p in placeholders)
    for p in placeholders:
        np.testing.assert_array_equal(got[p], own[p], err_msg=p)
    # the same command again: the finished run resumes (nothing left to do), no second warm start
    again = train(
        resolve_config(recipe(init_from=str(root / "from_clip")), data=root / "world"), root / "run"
    )
    assert again["resumed_from"] == 2 and again["warm_start"] is None


def test_no_model_section_takes_the_source_model(imported):
    from clocmllm.encoder.trainer import resolve_config
    from clocmllm.encoder.warm_start import source_config

    r = recipe(init_from=str(imported / "from_clip"))
    del r["model"]
    cfg = resolve_config(r, data=imported / "world")
    assert cfg["model"] == source_config(imported / "from_clip")[1]["model"]


def test_an_imported_clip_is_evaluated_as_clip(imported):
    """Its prompter is a placeholder: `eval encoder` reads its regions by RoI-Align."""
    from clocmllm.encoder.evaluators import evaluate_checkpoint

    got = evaluate_checkpoint(imported / "from_clip", imported / "world", zero_shot=False)
    roi = evaluate_checkpoint(
        imported / "from_clip", imported / "world", region_source="roi", zero_shot=False
    )
    prompter = evaluate_checkpoint(
        imported / "from_clip", imported / "world", region_source="prompter", zero_shot=False
    )
    keys = [k for k in got if k.startswith("region_")]
    assert keys and {k: got[k] for k in keys} == {k: roi[k] for k in keys}
    assert {k: got[k] for k in keys} != {k: prompter[k] for k in keys}


def test_training_in_the_import_folder_says_to_use_init_from(imported):
    from clocmllm.encoder.trainer import IncompatibleCheckpoint, resolve_config, train

    with pytest.raises(IncompatibleCheckpoint, match="--init-from "):
        train(resolve_config(recipe(), data=imported / "world"), imported / "from_clip")


def test_a_source_of_another_shape_is_refused_before_training(imported):
    from clocmllm.encoder.trainer import resolve_config, train
    from clocmllm.encoder.warm_start import WarmStartError

    r = recipe(init_from=str(imported / "from_clip"))
    r["model"] = {**r["model"], "vision_mlp_dim": 48}
    with pytest.raises(WarmStartError, match=r"visual/.*has shape .*vision_mlp_dim 64 -> 48"):
        train(resolve_config(r, data=imported / "world"), imported / "bad")
    assert not (imported / "bad" / "checkpoints").exists() or not any(
        (imported / "bad" / "checkpoints").iterdir()
    )


# The text_config / vision_config fields of OpenAI's B/16 and L/14 folders on the Hub (their
# config.json; eos_token_id 2 is the legacy value those files still carry).
OPENAI_B16 = {
    "model_type": "clip",
    "projection_dim": 512,
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu"},
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                    "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 2, "pad_token_id": 1},
}  # fmt: skip
OPENAI_L14_VISION = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                     "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                     "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip


@pytest.mark.parametrize(
    "hf, preset, resized",
    [
        (OPENAI_B16, "b16", []),
        (OPENAI_L14_VISION, "l14", []),
        (OPENAI_L14_VISION, "l14_336", ["visual/pos_embed ((257, 1024) -> (577, 1024))"]),
    ],
)
def test_openai_clip_imports_start_the_shipped_recipes(hf, preset, resized):
    """At real sizes (shapes only, jax.eval_shape): what `import-clip` makes of OpenAI's
    B/16 folder (both towers) and L/14 vision folder starts the models of `b16_cloc.yaml` and
    `l14_cloc.yaml` (336 px: the 224 px grid's position table is resampled): every imported
    tensor is copied, the placeholders and (L/14) the text tower start fresh, and no
    numerics field differs."""
    from clocmllm.adapters import hf_config, names
    from clocmllm.encoder.config import ModelConfig, load_model_config
    from clocmllm.encoder.models.clip import param_shapes
    from clocmllm.encoder.warm_start import check_numerics, flatten, plan

    fields, towers = hf_config.model_fields_from_hf(hf, "config.json")
    source_cfg = ModelConfig.from_dict(fields)
    rules = names.vision_rules(source_cfg.vision_layers, projection=True)
    if "text" in towers:
        rules += names.text_rules(source_cfg.text_layers, projection=True)
    imported = {r.jax for r in rules} | ({"logit_scale"} if "text" in towers else set())
    source = flatten(param_shapes(source_cfg))
    assert imported <= set(source)
    source["visual/pos_embed"] = np.zeros(source["visual/pos_embed"].shape, np.float32)  # resampled: values
    run_cfg = load_model_config(preset).to_dict()
    check_numerics(source_cfg.to_dict(), run_cfg, preset)
    target = {k: v.shape for k, v in flatten(param_shapes(ModelConfig.from_dict(run_cfg))).items()}
    got = plan(target, source, set(source) - imported)
    assert set(got.copied) == imported
    fresh_roots = {p.split("/")[0] for p in got.fresh}
    vision_only = {"text", "logit_scale"} if "text" not in towers else set()
    assert fresh_roots == {"prompter", "ground", "logit_bias"} | vision_only
    assert got.resized == resized


def test_cli_init_from_a_folder_without_weights_says_so(imported, capsys):
    import yaml

    from clocmllm.cli import main

    (imported / "recipe.yaml").write_text(yaml.safe_dump(recipe()))
    code = main(["pretrain", "--config", str(imported / "recipe.yaml"), "--workdir", str(imported / "cli"),
                 "--data", str(imported / "world"), "--init-from", str(imported / "world")])  # fmt: skip
    assert code == 1
    assert "init_from:" in capsys.readouterr().out and not (imported / "cli").exists()
