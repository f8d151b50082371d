"""CLOC encoder models: preset sizes vs HF CLIP, block math, pooling, prompter semantics."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from clocmllm.encoder.config import ConfigError, ModelConfig, load_model_config
from clocmllm.encoder.models.clip import CLIP, FAST_COMPILE, init_params, param_shapes
from clocmllm.encoder.models.transformer import Block

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Published sizes (OpenAI CLIP B/16, L/14; OpenCLIP H/14): total, vision tower incl. projection.
KNOWN = {"b16": (149.6e6, 86.2e6), "l14": (427.6e6, 304.3e6), "h14": (986.1e6, 632.1e6)}


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _hf_meta_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(vision model, text model, total) parameter counts of the equivalent HF CLIPModel."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.CLIPConfig(
        vision_config=dict(
            hidden_size=cfg.vision_width,
            intermediate_size=cfg.vision_mlp_dim,
            num_attention_heads=cfg.vision_heads,
            num_hidden_layers=cfg.vision_layers,
            patch_size=cfg.patch_size,
            image_size=cfg.image_size,
            hidden_act=cfg.hidden_act,
        ),
        text_config=dict(
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_mlp_dim,
            num_attention_heads=cfg.text_heads,
            num_hidden_layers=cfg.text_layers,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.context_length,
        ),
        projection_dim=cfg.embed_dim,
    )
    with torch.device("meta"):
        hf = transformers.CLIPModel(hf_cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return n(hf.vision_model), n(hf.text_model), n(hf)


@pytest.mark.parametrize("preset", ["b16", "l14", "h14"])
def test_preset_param_counts_match_hf_clip(preset):
    cfg = load_model_config(preset)
    shapes = param_shapes(cfg)
    vision = _count({k: v for k, v in shapes["visual"].items() if k != "proj"})
    text = _count({k: v for k, v in shapes["text"].items() if k != "proj"})
    total = _count([shapes["visual"], shapes["text"], shapes["logit_scale"]])
    hf_vision, hf_text, hf_total = _hf_meta_counts(cfg)
    assert (vision, text, total) == (hf_vision, hf_text, hf_total)
    known_total, known_vision = KNOWN[preset]
    assert abs(total - known_total) / known_total < 0.01
    vision_with_proj = vision + _count(shapes["visual"]["proj"])
    assert abs(vision_with_proj - known_vision) / known_vision < 0.01
    # every parameter is float32 even when computing in bfloat16
    assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}
    # the fsdp rule (largest divisible dim, encoder/sharding.py) can split every big leaf 8 ways
    big = [x.shape for x in jax.tree_util.tree_leaves(shapes) if np.prod(x.shape) >= 2**14]
    assert all(any(d % 8 == 0 for d in shape) for shape in big)


class Jitted:
    """model.apply(variables, *args, method=name) jitted once per (method, static args).

    Tests run tiny models: compile time dominates, so compile without LLVM optimisation.
    """

    def __init__(self, module):
        self.module = module
        self.cache = {}

    def apply(self, variables, *args, method="__call__"):
        static = tuple(a for a in args if isinstance(a, bool))
        arrays = [a for a in args if not isinstance(a, bool)]
        key = (method, static)
        if key not in self.cache:
            fn = lambda v, *xs: self.module.apply(v, *xs, *static, method=method)  # noqa: E731
            self.cache[key] = jax.jit(fn, compiler_options=FAST_COMPILE)
        return self.cache[key](variables, *arrays)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config("tiny")
    model = Jitted(CLIP(cfg))
    params = init_params(cfg, 0)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, cfg.image_size, cfg.image_size, 3)), jnp.float32)
    ids = rng.integers(4, cfg.vocab_size, size=(2, cfg.context_length)).astype(np.int32)
    ids[0, 5], ids[1, 9] = cfg.eot_token_id, cfg.eot_token_id
    return cfg, model, {"params": params}, images, jnp.asarray(ids)


def test_param_tree_names(tiny):
    cfg, _, variables, _, _ = tiny
    flat = {"/".join(k): v.shape for k, v in flatten_dict(variables["params"]).items()}
    d, e, p = cfg.vision_width, cfg.embed_dim, cfg.patch_size
    assert flat["visual/patch_embed/kernel"] == (p, p, 3, d)
    assert flat["visual/pos_embed"] == (cfg.num_patches + 1, d)
    assert flat["visual/layer_1/attn/qkv/kernel"] == (d, 3 * d)
    assert flat["visual/proj/kernel"] == (d, e)
    assert flat["text/token_embed/embedding"] == (cfg.vocab_size, cfg.text_width)
    assert flat["prompter/box_embed/corner_embed"] == (2, d)
    assert flat["prompter/text_in/kernel"] == (e, d)
    assert flat["ground/fc2/kernel"] == (d, 4)
    assert flat["logit_scale"] == () and flat["logit_bias"] == ()
    assert np.isclose(float(variables["params"]["logit_scale"]), np.log(1 / 0.07))
    assert float(variables["params"]["logit_bias"]) == -10.0
    assert not any("bias" in k for k in flat if k.endswith("proj/bias"))


def test_forward_every_method(tiny):
    cfg, model, v, images, ids = tiny
    boxes = jnp.asarray([[[0.1, 0.1, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.4, 0.9]]] * 2)

    def every_method(v, images, ids, boxes):  # one compile for all methods
        m = model.module
        out = m.apply(v, images, ids)
        tokens = m.apply(v, images, method="encode_image_tokens")
        img = m.apply(v, tokens, method="pool_image")
        txt = m.apply(v, ids, method="encode_text")
        emb, feat = m.apply(v, tokens, boxes, method="region_embed")
        temb, tfeat = m.apply(v, tokens, jnp.stack([txt, txt], 1), method="text_prompt_embed")
        pred = m.apply(v, tfeat, method="ground")
        both = m.apply(v, tokens, boxes, jnp.stack([txt, txt], 1), method="region_and_text_prompt_embed")
        return out, tokens, img, txt, emb, feat, temb, tfeat, pred, both

    run = jax.jit(every_method, compiler_options=FAST_COMPILE)
    out, tokens, img, txt, emb, feat, temb, tfeat, pred, both = run(v, images, ids, boxes)
    # one prompter pass for both prompt kinds (shared image keys/values) = the two separate ones
    for got, want in zip(jax.tree.leaves(both), (emb, feat, temb, tfeat), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert tokens.shape == (2, cfg.num_patches + 1, cfg.vision_width)
    np.testing.assert_allclose(out["image_emb"], img, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["text_emb"], txt, rtol=1e-5, atol=1e-5)
    assert img.shape == txt.shape == (2, cfg.embed_dim)
    assert emb.shape == (2, 3, cfg.embed_dim) and feat.shape == (2, 3, cfg.vision_width)
    assert temb.shape == (2, 2, cfg.embed_dim) and tfeat.shape == (2, 2, cfg.vision_width)
    assert pred.shape == (2, 2, 4)
    assert bool(jnp.all((pred > 0) & (pred < 1)))
    for x in (img, txt, emb, temb, pred):
        assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
    # the text-prompted and box-prompted paths differ, and both depend on their prompt
    assert float(jnp.abs(emb[:, 0] - emb[:, 1]).max()) > 1e-3


def _np_layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _np_block(x, p, heads, eps, causal=False):
    """HF CLIPEncoderLayer written out in numpy, float64, one sequence [T, D]."""
    t, d = x.shape
    dh = d // heads
    h = _np_layer_norm(x, p["ln1"]["scale"], p["ln1"]["bias"], eps)
    qkv = h @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    out = np.zeros((t, d))
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)
        s = (q[:, sl] * dh**-0.5) @ k[:, sl].T
        if causal:
            s = np.where(np.tri(t, dtype=bool), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        out[:, sl] = (a / a.sum(-1, keepdims=True)) @ v[:, sl]
    x = x + out @ p["attn"]["out"]["kernel"] + p["attn"]["out"]["bias"]
    h = _np_layer_norm(x, p["ln2"]["scale"], p["ln2"]["bias"], eps)
    h = h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    h = h / (1 + np.exp(-1.702 * h))  # quick_gelu
    return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def test_hidden_states_follow_hf_semantics(tiny):
    cfg, model, v, images, _ = tiny
    hs = model.apply(v, images, True, method="encode_image_tokens")
    tokens = model.apply(v, images, method="encode_image_tokens")
    assert len(hs) == cfg.vision_layers + 1
    np.testing.assert_array_equal(hs[-1], tokens)
    # [0] is the embedding after pre-layernorm (init scale 1, bias 0): standardised tokens
    h0 = np.asarray(hs[0], np.float64)
    np.testing.assert_allclose(h0.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(h0.std(-1), 1.0, atol=1e-3)
    # [i] is the output of block i-1, with HF CLIPEncoderLayer's math
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"]["visual"])
    for i in range(cfg.vision_layers):
        ref = _np_block(np.asarray(hs[i][1], np.float64), p[f"layer_{i}"], cfg.vision_heads, 1e-5)
        np.testing.assert_allclose(hs[i + 1][1], ref, rtol=2e-4, atol=2e-4)


def test_text_pools_first_eot_and_is_causal(tiny):
    cfg, model, v, _, ids = tiny
    base = np.asarray(ids).copy()
    changed = base.copy()
    changed[0, 6:] = cfg.eot_token_id  # more EOTs after the first one (at 5) plus other tokens
    changed[1, 10:] = 7  # tokens after the first EOT (at 9)
    a = model.apply(v, jnp.asarray(base), method="encode_text")
    b = model.apply(v, jnp.asarray(changed), method="encode_text")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    before = base.copy()
    before[0, 2] = 11  # a token before the EOT does change the embedding
    c = model.apply(v, jnp.asarray(before), method="encode_text")
    assert float(jnp.abs(c[0] - a[0]).max()) > 1e-4
    np.testing.assert_allclose(c[1], a[1], rtol=1e-5, atol=1e-6)
    # the causal block matches the numpy reference
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), v["params"]["text"])
    x = np.random.default_rng(1).normal(size=(7, cfg.text_width))
    block = Block(cfg.text_width, cfg.text_heads, cfg.text_mlp_dim, causal=True)
    got = Jitted(block).apply({"params": p["layer_0"]}, jnp.asarray(x, jnp.float32)[None])[0]
    ref = _np_block(x, p["layer_0"], cfg.text_heads, 1e-5, causal=True)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)
    # the last block runs its MLP on the pooled rows only (Block.at_rows): same rows
    rows = jnp.asarray([3], jnp.int32)
    last = Jitted(block).apply(
        {"params": p["layer_0"]}, jnp.asarray(x, jnp.float32)[None], rows, method="at_rows"
    )
    np.testing.assert_allclose(last[0], got[3], rtol=1e-5, atol=1e-6)


def test_prompter_box_sensitivity_and_padding_independence(tiny):
    cfg, model, v, images, _ = tiny
    tokens = model.apply(v, images, method="encode_image_tokens")
    boxes = np.asarray([[[0.1, 0.1, 0.5, 0.6], [0.2, 0.5, 0.9, 0.95], [0, 0, 0, 0]]] * 2, np.float32)
    emb, feat = model.apply(v, tokens, jnp.asarray(boxes), method="region_embed")
    assert float(jnp.abs(emb[:, 0] - emb[:, 1]).max()) > 1e-3  # depends on the box
    padded = boxes.copy()
    padded[:, 2] = [0.7, 0.0, 1.0, 0.3]  # change only the padded slot
    emb2, feat2 = model.apply(v, tokens, jnp.asarray(padded), method="region_embed")
    np.testing.assert_array_equal(emb[:, :2], emb2[:, :2])
    np.testing.assert_array_equal(feat[:, :2], feat2[:, :2])
    assert float(jnp.abs(emb[:, 2] - emb2[:, 2]).max()) > 1e-3
    # depends on the image too
    emb3, _ = model.apply(v, tokens[::-1], jnp.asarray(boxes), method="region_embed")
    assert float(jnp.abs(emb3[0, 0] - emb[1, 0]).max()) < 1e-5
    assert float(jnp.abs(emb3[0, 0] - emb[0, 0]).max()) > 1e-4


def test_prompter_equals_full_sequence_block(tiny):
    """The prefix shortcut == one block over [image tokens ; prompt tokens], pooled over prompts."""
    cfg, model, v, images, _ = tiny
    from clocmllm.encoder.models.prompter import BoxEmbed

    tokens = model.apply(v, images, method="encode_image_tokens")
    boxes = jnp.asarray([[[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.8, 0.9]]] * 2)
    _, feat = model.apply(v, tokens, boxes, method="region_embed")
    pp = v["params"]["prompter"]
    prompts = Jitted(BoxEmbed(cfg)).apply({"params": pp["box_embed"]}, boxes)  # [B, M, 2, D]
    block = Block(cfg.vision_width, cfg.prompter_heads, cfg.vision_mlp_dim, act=cfg.hidden_act)
    # the M sequences of each image, as the contract states them: [B*M, 1+N+2, D]
    seqs = jnp.concatenate([jnp.repeat(tokens[:, None], 2, axis=1), prompts], axis=2)
    out = Jitted(block).apply({"params": pp["layer"]}, seqs.reshape(4, *seqs.shape[2:]))
    pooled = np.asarray(out[:, -2:].mean(1)).reshape(2, 2, -1)
    ref = _np_layer_norm(pooled, pp["ln"]["scale"], pp["ln"]["bias"], 1e-5)
    np.testing.assert_allclose(feat, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads", [1, 4])
def test_prefix_attention_forms_equal_the_full_sequence_block(heads, monkeypatch):
    """`Block.with_prefix` in its absorbed form (no prefix keys/values; q folded through Wk,
    the mixed tokens through Wv) and in its plain form: the outputs of the last P positions
    of one block over each [prefix ; prompt] sequence, and the same gradients for params,
    prompts and prefix; with a per-prompt key bias, the two forms agree with each other."""
    from clocmllm.encoder.models import transformer as T

    b, m, p, s, d = 2, 3, 2, 7, 16
    block = Block(d, heads, 4 * d)
    rng = np.random.default_rng(heads)
    x, prefix = (jnp.asarray(rng.normal(size=sh), jnp.float32) for sh in ((b, m, p, d), (b, s, d)))
    params = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, s + p, d)))["params"]
    # non-zero k/v biases: the absorbed form adds q.bk and sum(p_prefix) bv back explicitly
    params = jax.tree_util.tree_map(
        lambda a: a + 0.1 * jnp.asarray(rng.normal(size=a.shape), a.dtype), params
    )
    bias = jnp.where(jnp.asarray(rng.random((b, m, s)) < 0.3), -1e9, 0.0)
    dy = jnp.asarray(rng.normal(size=(b, m, p, d)), jnp.float32)

    def full(pr, x, prefix):
        seqs = jnp.concatenate([jnp.repeat(prefix[:, None], m, axis=1), x], axis=2)
        return block.apply({"params": pr}, seqs.reshape(b * m, s + p, d))[:, s:].reshape(b, m, p, d)

    def grads(fn, *args):
        out, vjp = jax.vjp(fn, params, x, prefix, *args)
        return out, vjp(dy)[:3]

    results = {}
    for absorbed in (True, False):
        monkeypatch.setattr(T, "absorb_prefix", lambda *a, absorbed=absorbed: absorbed)

        def prompted(pr, x, prefix, bias=None):
            return block.apply({"params": pr}, x, prefix, bias=bias, method="with_prefix")

        cache = block.apply({"params": params}, prefix, m * p, method="prefix_cache")
        assert (cache.tokens is not None) == absorbed and (cache.k is None) == absorbed
        results[absorbed] = grads(jax.jit(prompted)), grads(jax.jit(prompted), bias)
    want = grads(jax.jit(full))
    for absorbed in (True, False):
        for got, ref in zip(
            jax.tree_util.tree_leaves(results[absorbed][0]), jax.tree_util.tree_leaves(want), strict=True
        ):
            np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)
    masked = [jax.tree_util.tree_leaves(results[a][1]) for a in (True, False)]
    for got, ref in zip(*masked, strict=True):
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)


def test_absorb_prefix_picks_the_cheaper_form():
    """The prompter's 3 M = 12 query rows an image: absorbed at one head for every preset
    (and at the demo's 4 heads at width 64); plain once heads x queries outgrow the width."""
    from clocmllm.encoder.flops import absorb_prefix

    for preset in ("tiny", "vit_s16", "b16", "l14"):
        cfg = load_model_config(preset)
        assert absorb_prefix(cfg.num_image_tokens, cfg.vision_width, 1, 12), preset
    assert absorb_prefix(65, 64, 4, 12)
    assert not absorb_prefix(65, 64, 8, 12) and not absorb_prefix(197, 768, 12, 200)


@pytest.mark.parametrize("remat", [False, True])
def test_image_embedding_runs_the_last_block_at_the_class_token(tiny, remat):
    """`encode_image` (last block at the class token only) == `pool_image(encode_image_tokens)`,
    values and parameter gradients, with and without remat; and its compiled forward does
    fewer FLOPs (the patch rows' query, output projection and MLP are not computed)."""
    cfg, _, v, images, _ = tiny
    model = CLIP(cfg.replace(remat=remat))

    def full(m, x):
        return m.pool_image(m.encode_image_tokens(x))

    def emb(p, method):
        return jnp.sum(jnp.sin(model.apply({"params": p}, images, method=method)))

    grads = {}
    for name, method in (("embed", "encode_image"), ("full", full)):
        fn = jax.jit(
            jax.value_and_grad(lambda p, method=method: emb(p, method)), compiler_options=FAST_COMPILE
        )
        grads[name] = fn(v["params"])
    np.testing.assert_allclose(grads["embed"][0], grads["full"][0], rtol=1e-5)
    flat_e, flat_f = flatten_dict(grads["embed"][1]["visual"]), flatten_dict(grads["full"][1]["visual"])
    assert flat_e.keys() == flat_f.keys()
    for k in flat_f:
        np.testing.assert_allclose(flat_e[k], flat_f[k], rtol=2e-4, atol=1e-6, err_msg=str(k))

    def flops(method):
        fn = jax.jit(lambda p: model.apply({"params": p}, images, method=method))
        cost = fn.lower(v["params"]).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    assert flops("encode_image") < 0.85 * flops(full)


def test_bfloat16_compute_and_attention_impls(tiny):
    cfg, _, v, images, ids = tiny
    ref = Jitted(CLIP(cfg)).apply(v, images, ids)
    for changes in (
        {"dtype": "bfloat16"},
        {"attention_impl": "dot_product"},
        {"attention_impl": "einsum_bthd"},
    ):
        out = Jitted(CLIP(cfg.replace(**changes))).apply(v, images, ids)
        tol = 0.1 if changes.get("dtype") == "bfloat16" else 1e-4
        for key in ("image_emb", "text_emb"):
            assert out[key].dtype == jnp.float32
            scale = float(jnp.abs(ref[key]).max())
            assert float(jnp.abs(out[key] - ref[key]).max()) <= tol * scale, (changes, key)


def test_config_yaml_round_trip_and_errors(tmp_path):
    cfg = load_model_config("tiny", {"vision_layers": 3})
    assert cfg.vision_layers == 3 and ModelConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"model": cfg.to_dict(), "tokenizer": "tok.json"}))
    assert load_model_config(path) == cfg
    path.write_text("image_size: 64\npatch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"config\.yaml.*patch_sise"):
        load_model_config(path)
    with pytest.raises(ConfigError, match="vision_heads"):
        load_model_config("tiny", {"vision_heads": 5})
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_model_config("b17")


@pytest.mark.parametrize("t, causal", [(9, True), (9, False), (130, False)])
def test_attention_core_gradients_match_autodiff(t, causal):
    """The hand-written backward (transposed dk/dv GEMMs up to TRANSPOSED_GRAD_MAX_T, the
    plain einsums above) equals autodiff through the forward."""
    from clocmllm.encoder.models.transformer import TRANSPOSED_GRAD_MAX_T, _core_forward
    from clocmllm.encoder.models.transformer import _attention_core_cpu as attention_core

    assert (t <= TRANSPOSED_GRAD_MAX_T) == (t < 100)
    rng = np.random.default_rng(t)
    q, k, v, dy = (jnp.asarray(rng.normal(size=(2, 3, t, 8)), jnp.float32) for _ in range(4))
    got = jax.jit(jax.vjp(lambda *a: attention_core(*a, causal), q, k, v)[1])(dy)
    want = jax.jit(jax.vjp(lambda *a: _core_forward(*a, causal)[0], q, k, v)[1])(dy)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_narrowing_linear_gradients_match_autodiff():
    from clocmllm.encoder.models.transformer import _narrowing_linear_cpu as narrowing_linear

    rng = np.random.default_rng(0)
    x, w, dy = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((37, 24), (24, 8), (37, 8)))
    got = jax.jit(jax.vjp(narrowing_linear, x, w)[1])(dy)
    want = jax.jit(jax.vjp(jnp.dot, x, w)[1])(dy)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, causal", [(13, False), (13, True), (16, False)])
def test_padded_attention_equals_unpadded(t, causal):
    """The 'cudnn' impl pads odd sequence lengths (cuDNN's flash kernel refuses them in
    training) and masks the padding by sequence lengths: same output and gradients as plain
    attention. Checked through XLA's implementation here; the GPU runs cuDNN's."""
    from clocmllm.encoder.models.transformer import _core_forward, padded_dot_product_attention

    q, k, v, dy = (jax.random.normal(kk, (3, t, 2, 8)) for kk in jax.random.split(jax.random.key(t), 4))

    def ref(q, k, v):
        bhtd = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
        return bhtd(_core_forward(bhtd(q), bhtd(k), bhtd(v), causal)[0])

    def padded(q, k, v):
        return padded_dot_product_attention(q, k, v, causal, None, multiple=8)

    assert padded(q, k, v).shape == q.shape
    y_ref, g_ref = jax.value_and_grad(lambda *a: jnp.sum(ref(*a) * dy), argnums=(0, 1, 2))(q, k, v)
    y_pad, g_pad = jax.value_and_grad(lambda *a: jnp.sum(padded(*a) * dy), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(y_pad, y_ref, rtol=1e-5)
    for a, b in zip(g_pad, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_attention_auto_resolves_by_backend_and_dtype(monkeypatch):
    from clocmllm.encoder.models import transformer as T

    monkeypatch.setattr(T.jax, "default_backend", lambda: "cpu")
    assert T.resolve_attention("auto", jnp.bfloat16, head_dim=64) == "einsum"
    assert T.resolve_attention("dot_product", jnp.bfloat16, head_dim=64) == "dot_product"
    monkeypatch.setattr(T, "cuda_flash_gpu", lambda: True)
    assert T.resolve_attention("auto", jnp.bfloat16, head_dim=64) == "cudnn"
    assert T.resolve_attention("auto", jnp.float16, head_dim=64) == "cudnn"
    assert (
        T.resolve_attention("auto", jnp.float32, head_dim=64) == "einsum"
    )  # cuDNN flash needs half precision
    assert T.resolve_attention("auto", jnp.bfloat16, head_dim=768) == "einsum"  # a 1-head prompter at B/16
    assert T.resolve_attention("auto", jnp.bfloat16, head_dim=20) == "einsum"  # not a multiple of 8
    monkeypatch.setattr(T, "cuda_flash_gpu", lambda: False)  # ROCm, or a pre-Ampere CUDA card
    assert T.resolve_attention("auto", jnp.bfloat16, head_dim=64) == "einsum"


def test_cuda_flash_gpu_reads_the_device(monkeypatch):
    from clocmllm.encoder.models import transformer as T

    class Client:
        platform_version = "cuda 13000"

    class Device:
        client = Client()
        compute_capability = "9.0"

    monkeypatch.setattr(T.jax, "devices", lambda: [Device()])
    monkeypatch.setattr(T.jax, "default_backend", lambda: "gpu")
    assert T.cuda_flash_gpu()
    Device.compute_capability = "7.5"
    assert not T.cuda_flash_gpu()
    Device.compute_capability, Client.platform_version = "9.0", "rocm 6.2"
    assert not T.cuda_flash_gpu()
    monkeypatch.setattr(T.jax, "default_backend", lambda: "cpu")
    assert not T.cuda_flash_gpu()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cudnn_attention_wiring_equals_einsum(tiny, monkeypatch, dtype):
    """The 'cudnn' path of `Attention` (fused QKV split to [B, T, H, Dh]; tiny's 65 image
    tokens padded to 72; the causal text) gives the einsum model's loss and gradients.
    cuDNN itself needs a GPU: its call is swapped for XLA's here, so this checks our wiring
    and masking, not cuDNN's kernel."""
    from clocmllm.encoder.models import transformer as T

    padded = T.padded_dot_product_attention
    calls = []

    def xla(q, k, v, causal, implementation, multiple=8):
        calls.append((q.shape, causal, implementation))
        return padded(q, k, v, causal, None, multiple)

    monkeypatch.setattr(T, "padded_dot_product_attention", xla)
    cfg, _, v, images, ids = tiny

    def loss_and_grad(impl):
        model = CLIP(cfg.replace(attention_impl=impl, dtype=dtype))

        def loss(params):
            out = model.apply({"params": params}, images, ids)
            return jnp.sum(out["image_emb"] @ out["text_emb"].T)

        return jax.jit(jax.value_and_grad(loss))(v["params"])

    (l_ref, g_ref), (l_cud, g_cud) = loss_and_grad("einsum"), loss_and_grad("cudnn")
    assert {c[2] for c in calls} == {"cudnn"} and {c[1] for c in calls} == {False, True}
    assert any(shape[1] % 8 for shape, _, _ in calls)  # an odd length was padded
    tol = 5e-2 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(l_cud, l_ref, rtol=tol)
    for a, b in zip(jax.tree.leaves(g_cud), jax.tree.leaves(g_ref), strict=True):
        scale = float(jnp.abs(b).max()) + 1e-12
        assert float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) <= tol * scale


def test_generic_kernels_give_the_cpu_kernels_loss_and_gradients(tiny, monkeypatch):
    """The XLA-CPU-tuned backwards (custom VJPs, barriers; used on CPU) and plain autodiff
    (used on GPU/TPU, `cpu_kernels()`) are the same function: equal loss and gradients."""
    cfg, _, v, images, ids = tiny
    model = CLIP(cfg)

    def loss(params):
        out = model.apply({"params": params}, images, ids)
        return jnp.sum(out["image_emb"] @ out["text_emb"].T) + jnp.sum(out["image_emb"] ** 2)

    results, programs = {}, {}
    for kernels in ("cpu", "generic"):
        monkeypatch.setenv("CLOCMLLM_KERNELS", kernels)
        programs[kernels] = jax.jit(jax.grad(loss)).lower(v["params"]).as_text()
        results[kernels] = jax.jit(jax.value_and_grad(loss))(v["params"])  # traced anew: jit sees a new fn
    # two different programs: the CPU one fences its reductions and transposes in every block;
    # the generic one only the ones-vector of the two position-embedding GEMVs (`add_positions`)
    assert programs["cpu"].count("optimization_barrier") > 10
    assert programs["generic"].count("optimization_barrier") == 2
    (l_cpu, g_cpu), (l_gen, g_gen) = results["cpu"], results["generic"]
    np.testing.assert_allclose(l_gen, l_cpu, rtol=1e-5)
    flat_cpu, flat_gen = jax.tree.leaves(g_cpu), jax.tree.leaves(g_gen)
    assert len(flat_cpu) == len(flat_gen) > 10
    for a, b in zip(flat_gen, flat_cpu, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max() + 1e-12))
    monkeypatch.setenv("CLOCMLLM_KERNELS", "fast")
    with pytest.raises(ValueError, match="CLOCMLLM_KERNELS"):
        jax.jit(loss)(v["params"])


def test_bf16_token_embedding_gradient_sums_in_float32():
    """A bf16 text tower's token-embedding gradient: every token's row gradient is
    scatter-added into the table. Gathered from the float32 table, the sum runs in float32:
    within 1.5% of the float32 model's gradient on rows hit by 512 tokens each (0.5%
    measured). Summed in bf16, as `nn.Embed(dtype=bf16)` did, it was 5% off."""
    cfg = load_model_config("tiny")
    params = init_params(cfg, 0)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 40, size=(512, cfg.context_length)).astype(np.int32)  # 36 ids, many repeats
    ids[:, 6] = cfg.eot_token_id  # and one row hit by every sequence

    def table_grad(dtype):
        model = CLIP(cfg.replace(dtype=dtype))

        def loss(p):
            emb = model.apply({"params": p}, jnp.asarray(ids), method="encode_text")
            return jnp.sum(emb * jnp.linspace(-1, 1, emb.shape[-1]))

        return np.asarray(jax.jit(jax.grad(loss))(params)["text"]["token_embed"]["embedding"])

    g32, g16 = table_grad("float32"), table_grad("bfloat16")
    assert g16.dtype == np.float32  # parameters (and their gradients) stay float32
    rows = np.unique(ids)
    err = np.abs(g16[rows] - g32[rows]).max() / np.abs(g32[rows]).max()
    assert err < 0.015, err
