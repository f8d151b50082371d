"""clip-rocket loss: against a naive numpy reference, region terms on strong views, learning.

Compile time dominates here (XLA CPU codegen for a transformer's gradient), so every jitted
function is compiled once per module, at XLA backend optimisation level 0: it compiles ~40%
faster and these tiny graphs run just as fast.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from micro import micro_model

from clocmllm.encoder.config import load_model_config
from clocmllm.encoder.models.clip import CLIP, init_params
from clocmllm.encoder.recipes import rocket

B, N, M, T, S = 4, 2, 2, 8, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def setup():
    mc = load_model_config("tiny", micro_model(image_size=S, embed_dim=16, vocab_size=40, context_length=T))
    model = CLIP(mc)
    cfg = rocket.Config(num_views=N)
    params = init_params(mc, 0)
    params[rocket.PARAM_KEY] = rocket.init_extra_params(jax.random.key(1), mc, cfg)
    r = np.random.default_rng(0)

    def tokens(shape):
        ids = r.integers(4, mc.vocab_size, shape).astype(np.int32)
        ids[..., -1] = mc.eot_token_id
        return ids

    text = tokens((B, T))
    boxes = np.sort(r.random((B, N, M, 4)).reshape(B, N, M, 2, 2), axis=-2).reshape(B, N, M, 4)
    batch = {
        "images": r.normal(size=(B, S, S, 3)).astype(np.float32),
        "text": text,
        "region_text": tokens((B, M, T // 2)),  # phrases may use a shorter context than captions
        "region_boxes": boxes[:, 0].astype(np.float32),
        "region_valid": np.ones((B, M), bool),
        "aug_images": r.normal(size=(B, N, S, S, 3)).astype(np.float32),
        "aug_text": tokens((B, N, T)),
        "aug_region_boxes": boxes.astype(np.float32),
        "aug_region_valid": r.random((B, N, M)) > 0.3,
    }
    return mc, model, cfg, params, batch


def np_smoothed_nce(a, b, scale, eps):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    logits = min(np.exp(scale), 100.0) * a @ b.T
    n = len(a)
    target = (1 - eps) * np.eye(n) + eps / n

    def ce(lg):
        lg = lg - lg.max(axis=1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        return -(target * logp).sum(axis=1).mean()

    return 0.5 * (ce(logits) + ce(logits.T))


def np_mlp(p, x):
    from math import erf

    h = x @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
    h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    return h @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])


@pytest.fixture(scope="module")
def step(setup):
    """One jitted Adam step over the full rocket loss (regions on strong views included);
    compiled once for every test here (all batches share shapes)."""
    mc, model, cfg, params, batch = setup
    loss_fn = rocket.make_loss_fn(model, cfg, rocket.clip_loss_fn(model))
    tx = optax.adam(3e-3)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(p, opt, bt):
        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, bt)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss, metrics

    return step, tx


def test_loss_matches_numpy_reference(setup, step):
    mc, model, cfg, params, batch = setup
    step, tx = step
    # no valid region on any strong view: λ = 0, so the loss is exactly (global + n·aug)/(1+n)
    batch = {**batch, "aug_region_valid": np.zeros_like(batch["aug_region_valid"])}
    clip_params, extra = rocket.split_params(params)
    images = np.concatenate([batch["images"], batch["aug_images"].reshape(B * N, S, S, 3)])
    texts = np.concatenate([batch["text"], batch["aug_text"].reshape(B * N, T)])
    embed = jax.jit(
        lambda p, i, t: model.apply(
            {"params": p}, i, t, method=lambda m, i, t: (m.encode_image(i), m.encode_text(t))
        ),
        compiler_options=FAST_COMPILE,
    )
    img, txt = (np.asarray(x, np.float64) for x in embed(clip_params, images, texts))
    zi = np_mlp(extra["image"], img[B:]).reshape(B, N, -1)
    zt = np_mlp(extra["text"], txt[B:]).reshape(B, N, -1)
    scale = float(extra["logit_scale"])
    aug = np.mean([np_smoothed_nce(zi[:, j], zt[:, j], scale, 0.1) for j in range(N)])
    glob = np_smoothed_nce(img[:B], txt[:B], float(clip_params["logit_scale"]), 0.0)
    want = (glob + N * aug) / (1 + N)

    _, _, loss, metrics = step(params, tx.init(params), batch)
    assert float(metrics["rocket_lam"]) == 0.0
    np.testing.assert_allclose(float(metrics["rocket_aug_loss"]), aug, rtol=2e-4)
    np.testing.assert_allclose(float(metrics["global_loss"]), glob, rtol=2e-4)
    np.testing.assert_allclose(float(loss), want, rtol=2e-4)
    # label smoothing matters at this scale (so the check above would see it missing)
    assert abs(np_smoothed_nce(zi[:, 0], zt[:, 0], scale, 0.0) - aug) > 1e-3


def test_region_terms_on_strong_views_and_the_loss_learns(setup, step):
    mc, model, cfg, params, batch = setup
    step, tx = step
    p, opt, loss0, m0 = step(params, tx.init(params), batch)
    # λ per view = share of images with a valid region in that view (boxes followed the crop)
    lam = np.mean([batch["aug_region_valid"][:, j].any(axis=-1).mean() for j in range(N)])
    np.testing.assert_allclose(float(m0["rocket_lam"]), lam, rtol=1e-6)
    assert float(m0["rocket_region_loss"]) > 0 and float(m0["rocket_ground_loss"]) > 0
    first = (float(loss0), float(m0["rocket_aug_loss"]))
    for _ in range(30):
        p, opt, loss, metrics = step(p, opt, batch)
    assert float(loss) < 0.6 * first[0]
    assert float(metrics["rocket_aug_loss"]) < 0.6 * first[1]
    # the projector and its own temperature were trained, apart from the global temperature
    assert not np.allclose(p["rocket"]["image"]["fc1"]["kernel"], params["rocket"]["image"]["fc1"]["kernel"])
    assert float(p["rocket"]["logit_scale"]) != float(p["logit_scale"])


def test_config_from_dict_rejects_unknown_keys():
    cfg = rocket.Config.from_dict(
        {"num_views": 3, "augment": {"scale": [0.2, 1.0]}, "caption": {"ops": ["swap"]}}
    )
    assert cfg.num_views == 3 and cfg.augment.scale == (0.2, 1.0) and cfg.caption.ops == ("swap",)
    with pytest.raises(ValueError, match="recipe.yaml: unknown rocket field 'views'"):
        rocket.Config.from_dict({"views": 2}, "recipe.yaml")
    with pytest.raises(ValueError, match="augment"):
        rocket.Config.from_dict({"augment": {"blur": 1}})


def test_tiny_recipe_section_parses():
    import pathlib

    import yaml

    path = pathlib.Path(__file__).parents[1] / "scripts" / "recipes" / "tiny_rocket.yaml"
    recipe = yaml.safe_load(path.read_text())
    cfg = rocket.Config.from_dict(recipe["rocket"], str(path))
    assert recipe["recipe"] == "rocket" and cfg.num_views == 2 and cfg.caption.use_wordnet is False
