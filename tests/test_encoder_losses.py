"""CLOC losses against naive numpy/loop references (values and, for regions, gradients)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clocmllm.encoder import losses as L
from clocmllm.encoder.models.clip import FAST_COMPILE


def _jit(fn, **kw):
    """Tiny inputs: compile once per function, unoptimised (op-by-op dispatch compiles each op)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


clip_softmax_loss = _jit(L.clip_softmax_loss, static_argnums=3)
siglip_loss = _jit(L.siglip_loss)
region_text_loss = _jit(L.region_text_loss)
grounding_loss = _jit(L.grounding_loss)
region_weight = _jit(L.region_weight)
cloc_total = _jit(L.cloc_total)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax_row(row, j):
    m = max(row)
    return row[j] - (m + math.log(sum(math.exp(v - m) for v in row)))


def ref_clip(img, txt, log_scale, smoothing=0.0):
    img, txt = _unit(img), _unit(txt)
    s = min(math.exp(log_scale), 100.0)
    n = len(img)
    total = 0.0
    for logits in (
        [[s * img[i] @ txt[j] for j in range(n)] for i in range(n)],
        [[s * txt[i] @ img[j] for j in range(n)] for i in range(n)],
    ):
        for i in range(n):
            for j in range(n):
                target = (1 - smoothing) * (i == j) + smoothing / n
                total -= target * _log_softmax_row(logits[i], j)
    return total / (2 * n)


def ref_siglip(img, txt, log_scale, bias):
    img, txt = _unit(img), _unit(txt)
    t = math.exp(log_scale)
    total = 0.0
    for i in range(len(img)):
        for j in range(len(txt)):
            z = 1.0 if i == j else -1.0
            logit = t * img[i] @ txt[j] + bias
            total += math.log1p(math.exp(-z * logit))
    return total / len(img)


def ref_region(reg, txt, valid, log_scale, thr):
    """Loop over valid anchors; negatives are valid, differently-texted slots."""
    b, m, e = reg.shape
    r, t = reg.reshape(-1, e), txt.reshape(-1, e)
    v = valid.reshape(-1)
    keep = [k for k in range(b * m) if v[k]]
    if not keep:
        return 0.0
    r, t = _unit(r[keep]), _unit(t[keep])
    s = min(math.exp(log_scale), 100.0)
    total = 0.0
    for i in range(len(keep)):
        cols = [j for j in range(len(keep)) if j == i or t[i] @ t[j] <= thr]
        r2t = [s * r[i] @ t[j] for j in cols]
        t2r = [s * t[i] @ r[j] for j in cols]
        pos = cols.index(i)
        total -= 0.5 * (_log_softmax_row(r2t, pos) + _log_softmax_row(t2r, pos))
    return total / len(keep)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_clip_softmax_loss_matches_reference(smoothing):
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    for log_scale in (math.log(1 / 0.07), math.log(200.0)):  # second one hits the clip at 100
        got = clip_softmax_loss(jnp.asarray(img), jnp.asarray(txt), log_scale, smoothing)
        assert float(got) == pytest.approx(ref_clip(img, txt, log_scale, smoothing), rel=1e-5)
    # scale-invariant in the embeddings (normalised inside)
    again = clip_softmax_loss(jnp.asarray(3 * img), jnp.asarray(0.5 * txt), 2.0, smoothing)
    assert float(again) == pytest.approx(ref_clip(img, txt, 2.0, smoothing), rel=1e-5)


def test_siglip_loss_matches_reference():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    got = siglip_loss(jnp.asarray(img), jnp.asarray(txt), math.log(10.0), -10.0)
    assert float(got) == pytest.approx(ref_siglip(img, txt, math.log(10.0), -10.0), rel=1e-5)
    got = siglip_loss(jnp.asarray(img), jnp.asarray(txt), 1.3, 0.7)
    assert float(got) == pytest.approx(ref_siglip(img, txt, 1.3, 0.7), rel=1e-5)


def _region_case():
    rng = np.random.default_rng(2)
    b, m, e = 3, 3, 6
    reg = rng.normal(size=(b, m, e))
    txt = rng.normal(size=(b, m, e))
    txt[1, 0] = txt[0, 0] * 2.0  # the same phrase in two images: cos = 1, filtered
    txt[2, 1] = txt[0, 1] + 0.05 * rng.normal(size=e)  # a near synonym: cos > 0.9
    valid = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 0]], bool)
    reg[0, 2] = txt[0, 2] = 0.0  # padded slots may even be all-zero
    return reg, txt, valid


def test_region_text_loss_values_and_gradients_match_reference():
    reg, txt, valid = _region_case()
    log_scale = 1.5
    got = region_text_loss(jnp.asarray(reg), jnp.asarray(txt), jnp.asarray(valid), log_scale)
    want = ref_region(reg, txt, valid, log_scale, 0.9)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # filtering is active in this case: without it the loss differs
    unfiltered = ref_region(reg, txt, valid, log_scale, 1.01)
    assert abs(unfiltered - want) > 1e-3
    got_unf = region_text_loss(jnp.asarray(reg), jnp.asarray(txt), jnp.asarray(valid), log_scale, 1.01)
    assert float(got_unf) == pytest.approx(unfiltered, rel=1e-5)

    # gradients vs central differences of the float64 loop reference
    grad_fn = _jit(jax.grad(L.region_text_loss, argnums=(0, 1, 3)))
    g_reg, g_txt, g_scale = grad_fn(
        jnp.asarray(reg, jnp.float32),
        jnp.asarray(txt, jnp.float32),
        jnp.asarray(valid),
        jnp.float32(log_scale),
    )
    h = 1e-5
    for arr, grad in ((reg, g_reg), (txt, g_txt)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            if arr is reg:
                f = lambda x: ref_region(x, txt, valid, log_scale, 0.9)  # noqa: E731
            else:
                f = lambda x: ref_region(reg, x, valid, log_scale, 0.9)  # noqa: E731
            num[idx] = (f(plus) - f(minus)) / (2 * h)
        np.testing.assert_allclose(np.asarray(grad), num, rtol=2e-3, atol=2e-5)
        # padded slots get no gradient
        assert np.all(np.asarray(grad)[~valid] == 0.0)
    num_scale = (
        ref_region(reg, txt, valid, log_scale + h, 0.9) - ref_region(reg, txt, valid, log_scale - h, 0.9)
    ) / (2 * h)
    assert float(g_scale) == pytest.approx(num_scale, rel=2e-3)


def test_region_text_loss_masks_padding_content():
    reg, txt, valid = _region_case()
    base = region_text_loss(jnp.asarray(reg), jnp.asarray(txt), jnp.asarray(valid), 2.0)
    reg2, txt2 = reg.copy(), txt.copy()
    reg2[~valid] = 123.0
    txt2[~valid] = reg[0, 0]  # padded text equal to a valid region's direction
    other = region_text_loss(jnp.asarray(reg2), jnp.asarray(txt2), jnp.asarray(valid), 2.0)
    assert float(other) == pytest.approx(float(base), rel=1e-6)


def test_zero_region_cases_are_finite():
    rng = np.random.default_rng(3)
    reg = jnp.asarray(rng.normal(size=(2, 2, 4)), jnp.float32)
    txt = jnp.asarray(rng.normal(size=(2, 2, 4)), jnp.float32)
    none = jnp.zeros((2, 2), bool)
    loss, grads = _jit(jax.value_and_grad(L.region_text_loss, argnums=(0, 1)))(reg, txt, none, 2.0)
    assert float(loss) == 0.0
    assert all(bool(jnp.all(g == 0.0)) for g in grads)
    # one image without regions: equals the loss over the other image alone
    one = jnp.asarray([[True, True], [False, False]])
    got = region_text_loss(reg, txt, one, 2.0)
    alone = region_text_loss(reg[:1], txt[:1], one[:1], 2.0)
    assert float(got) == pytest.approx(float(alone), rel=1e-6)
    g = _jit(jax.grad(L.grounding_loss))(jnp.full((2, 2, 4), 0.5), jnp.full((2, 2, 4), jnp.nan), none)
    assert float(grounding_loss(jnp.zeros((2, 2, 4)), jnp.ones((2, 2, 4)), none)) == 0.0
    assert bool(jnp.all(jnp.isfinite(g)))


def test_grounding_loss_matches_reference():
    rng = np.random.default_rng(4)
    pred, true = rng.uniform(size=(3, 4, 4)), rng.uniform(size=(3, 4, 4))
    valid = rng.uniform(size=(3, 4)) > 0.4
    valid[0, 0] = True
    true[~valid] = np.nan  # padded targets are never read
    want = sum(
        sum((pred[i, j, c] - true[i, j, c]) ** 2 for c in range(4))
        for i in range(3)
        for j in range(4)
        if valid[i, j]
    ) / (4 * valid.sum())
    got = grounding_loss(jnp.asarray(pred), jnp.asarray(true), jnp.asarray(valid))
    assert float(got) == pytest.approx(want, rel=1e-5)
    # all valid: exactly the paper's mean over 4·M·N
    full = np.ones((3, 4), bool)
    t2 = np.nan_to_num(true)
    got = grounding_loss(jnp.asarray(pred), jnp.asarray(t2), jnp.asarray(full))
    assert float(got) == pytest.approx(float(np.mean((pred - t2) ** 2)), rel=1e-5)


def test_region_weight_and_total():
    valid = jnp.asarray([[True, False], [False, False], [False, True], [False, False]])
    assert float(region_weight(valid)) == pytest.approx(0.5)
    assert float(region_weight(jnp.zeros((3, 4), bool))) == 0.0
    total, metrics = cloc_total(jnp.float32(2.0), jnp.float32(3.0), jnp.float32(0.25), valid)
    assert float(total) == pytest.approx(2.0 + 0.5 * (3.0 + 0.25))
    assert float(metrics["lambda"]) == pytest.approx(0.5)
    assert set(metrics) >= {"loss", "loss_clip", "loss_region", "loss_ground", "lambda"}


@pytest.mark.parametrize("mode", ["clip", "cloc"])
def test_trimmed_captions_give_the_same_loss_and_gradients(mode):
    """trim_captions (the trainer's cut of captions after the batch's longest first EOT) is
    exact in both modes: same loss, same gradients, none reaching the positions cut."""
    from micro import micro_model

    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.input_pipeline import trim_captions
    from clocmllm.encoder.models.clip import CLIP, init_params
    from clocmllm.encoder.trainer import DEFAULTS, deep_merge, make_loss_fn

    mc = load_model_config("tiny", micro_model(context_length=16, eot_token_id=3))
    model = CLIP(mc)
    params = init_params(mc, 0)
    rng = np.random.default_rng(1)
    b, m, t = 3, 2, 16
    text = np.zeros((b, t), np.int32)
    for i, n in enumerate((3, 5, 2)):  # SOT + n words + EOT, then padding
        text[i, : n + 2] = [1, *rng.integers(4, mc.vocab_size, n), 3]
    batch = {
        "images": rng.normal(size=(b, mc.image_size, mc.image_size, 3)).astype(np.float32),
        "text": text,
        "region_boxes": np.tile(np.array([0.1, 0.2, 0.6, 0.7], np.float32), (b, m, 1)),
        "region_valid": np.ones((b, m), bool),
        "region_text": np.tile(np.array([1, 5, 6, 3], np.int32), (b, m, 1)),
    }
    if mode == "clip":
        batch = {k: batch[k] for k in ("images", "text")}
    trimmed = trim_captions(batch, mc.eot_token_id)
    assert trimmed["text"].shape[-1] == 8 < t
    grad = _jit(jax.value_and_grad(make_loss_fn(model, deep_merge(DEFAULTS, {"mode": mode})), has_aux=True))
    (l_full, _), g_full = grad(params, batch)
    (l_trim, _), g_trim = grad(params, trimmed)
    assert abs(float(l_full) - float(l_trim)) <= 1e-6

    def rel(a, c):  # another T reorders the float32 sums of the weight gradients
        return float(jnp.max(jnp.abs(a - c)) / max(1.0, float(jnp.max(jnp.abs(a)))))

    assert max(jax.tree.leaves(jax.tree.map(rel, g_full, g_trim))) <= 1e-6
    assert float(jnp.abs(g_full["text"]["pos_embed"][7:]).max()) == 0.0  # nothing reads past EOT


def test_trimmed_region_phrases_give_the_same_cloc_loss_and_gradients():
    """trim_region_text (the trainer's cut of phrases after their first EOT) is exact."""
    from micro import micro_model

    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.input_pipeline import trim_region_text
    from clocmllm.encoder.models.clip import CLIP, init_params
    from clocmllm.encoder.trainer import DEFAULTS, deep_merge, make_loss_fn

    mc = load_model_config("tiny", micro_model(context_length=16, eot_token_id=3))
    model = CLIP(mc)
    params = init_params(mc, 0)
    rng = np.random.default_rng(0)
    b, m, t = 3, 2, 16
    rtext = np.zeros((b, m, t), np.int32)
    for i in range(b):
        for j in range(m):
            n = int(rng.integers(2, 7))  # 2-6 words + SOT + EOT
            rtext[i, j, : n + 2] = [1, *rng.integers(4, mc.vocab_size, n), 3]
    valid = np.array([[True, True], [True, False], [True, True]])
    rtext[1, 1] = 0
    text = np.zeros((b, t), np.int32)
    text[:, :6] = [1, 5, 6, 7, 8, 3]
    batch = {
        "images": rng.normal(size=(b, mc.image_size, mc.image_size, 3)).astype(np.float32),
        "text": text,
        "region_boxes": np.tile(np.array([0.1, 0.2, 0.6, 0.7], np.float32), (b, m, 1)),
        "region_valid": valid,
        "region_text": rtext,
    }
    trimmed = trim_region_text(batch, mc.eot_token_id)
    assert trimmed["region_text"].shape[-1] == 8 < t
    grad = _jit(jax.value_and_grad(make_loss_fn(model, deep_merge(DEFAULTS, {"mode": "cloc"})), has_aux=True))
    (l_full, _), g_full = grad(params, batch)
    (l_trim, _), g_trim = grad(params, trimmed)
    assert abs(float(l_full) - float(l_trim)) <= 1e-6

    # the weight gradients sum over B*M*T rows: another T reorders the float32 sums, so
    # compare relative to each gradient's scale
    def rel(a, c):
        return float(jnp.max(jnp.abs(a - c)) / max(1.0, float(jnp.max(jnp.abs(a)))))

    rel = jax.tree.map(rel, g_full, g_trim)
    assert max(jax.tree.leaves(rel)) <= 1e-6
    assert float(jnp.abs(g_full["text"]["pos_embed"][8:]).max()) == 0.0  # nothing reads past EOT


def test_deduplicated_region_phrases_give_the_same_cloc_loss_and_gradients():
    """dedup_region_text (each distinct phrase of a batch encoded once, then gathered) is exact,
    with repeated phrases (same image and across images), padded slots and the text filter."""
    from micro import micro_model

    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.input_pipeline import dedup_region_text, trim_region_text
    from clocmllm.encoder.models.clip import CLIP, init_params
    from clocmllm.encoder.trainer import DEFAULTS, deep_merge, make_loss_fn

    mc = load_model_config("tiny", micro_model(context_length=16, eot_token_id=3))
    model = CLIP(mc)
    params = init_params(mc, 0)
    rng = np.random.default_rng(1)
    b, m, t = 4, 3, 16
    vocab = [[1, *rng.integers(4, mc.vocab_size, int(n)), 3] for n in (2, 3, 5)]  # 3 distinct phrases
    rtext = np.zeros((b, m, t), np.int32)
    pick = np.array([[0, 0, 1], [1, 2, 0], [2, 0, 0], [1, 1, 2]])  # repeats within and across images
    for i, j in np.ndindex(b, m):
        rtext[i, j, : len(vocab[pick[i, j]])] = vocab[pick[i, j]]
    valid = np.ones((b, m), bool)
    valid[2, 1:] = False
    rtext[2, 1:] = 0
    text = np.zeros((b, t), np.int32)
    text[:, :6] = [1, 5, 6, 7, 8, 3]
    batch = {
        "images": rng.normal(size=(b, mc.image_size, mc.image_size, 3)).astype(np.float32),
        "text": text,
        "region_boxes": (rng.random((b, m, 4)) * 0.5 + [0, 0, 0.5, 0.5]).astype(np.float32),
        "region_valid": valid,
        "region_text": rtext,
    }
    trimmed = trim_region_text(batch, mc.eot_token_id)
    dedup = dedup_region_text(trimmed, align=2)
    # 3 phrases + the zero row, padded to 8 rows (phrase_count_bucket), of 12 slots
    assert "region_text" not in dedup and dedup["region_phrases"].shape == (8, 8)
    assert (dedup["region_phrases"][dedup["region_phrase_index"]] == trimmed["region_text"]).all()
    grad = _jit(jax.value_and_grad(make_loss_fn(model, deep_merge(DEFAULTS, {"mode": "cloc"})), has_aux=True))
    (l_full, aux_full), g_full = grad(params, trimmed)
    (l_dedup, aux_dedup), g_dedup = grad(params, dedup)
    assert abs(float(l_full) - float(l_dedup)) <= 1e-6
    assert abs(float(aux_full["region_loss"]) - float(aux_dedup["region_loss"])) <= 1e-6

    def rel(a, c):  # summed in another order: relative to each gradient's scale
        return float(jnp.max(jnp.abs(a - c)) / max(1.0, float(jnp.max(jnp.abs(a)))))

    assert max(jax.tree.leaves(jax.tree.map(rel, g_full, g_dedup))) <= 1e-6


def test_phrase_count_bucket_few_shapes_and_aligned():
    from clocmllm.encoder.input_pipeline import phrase_count_bucket

    got = [phrase_count_bucket(u, 256) for u in (1, 16, 17, 101, 112, 113, 256)]
    assert got == [16, 16, 32, 112, 112, 128, 256]
    assert {phrase_count_bucket(u, 16) for u in range(1, 17)} == {8, 16}  # small batches: 2 shapes
    assert all(phrase_count_bucket(u, 256, 8) % 8 == 0 for u in range(1, 257))
    assert all(u <= phrase_count_bucket(u, 12, 3) <= 12 for u in range(1, 13))


def test_dedup_rows_only_grow_across_batches():
    """The trainer's `PhraseDedup`: a run's phrase arrays take one or two shapes (one step
    compile each), not one per distinct count its batches need."""
    from clocmllm.encoder.input_pipeline import PhraseDedup, dedup_region_text, phrase_count_bucket

    assert phrase_count_bucket(20, 256, floor=112) == 112 and phrase_count_bucket(120, 256, floor=112) == 128
    assert phrase_count_bucket(20, 256, floor=1 << 30) == 256  # capped at the slot count
    rng = np.random.default_rng(0)
    dedup, shapes, free = PhraseDedup(), set(), set()
    for _ in range(40):  # 16 x 4 slots of 5-token phrases from a 40- or 12-phrase vocabulary
        vocab = rng.integers(1, 50, (40, 5))
        tokens = vocab[rng.integers(0, 40 if rng.random() < 0.5 else 12, (16, 4))]
        batch = {"region_text": tokens, "region_valid": np.ones((16, 4), bool)}
        out = dedup(batch)
        shapes.add(out["region_phrases"].shape if "region_phrases" in out else out["region_text"].shape)
        free.add(dedup_region_text(batch)["region_phrases"].shape)  # per-batch counts, no floor
        if "region_phrases" in out:  # still exact: every slot finds its own phrase
            np.testing.assert_array_equal(out["region_phrases"][out["region_phrase_index"]], tokens)
    assert len(shapes) <= 2 < len(free), (shapes, free)
