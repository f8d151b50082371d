"""Captions and region phrases packed into rows (encoder/text_packing.py): the packing itself,
and that the packed text pass gives the unpacked embeddings, CLIP / CLOC loss and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from micro import micro_model

from clocmllm.encoder.config import load_model_config
from clocmllm.encoder.input_pipeline import dedup_region_text, trim_region_text
from clocmllm.encoder.models.clip import CLIP, init_params
from clocmllm.encoder.text_packing import (
    Packer,
    fill_rows,
    pack_captions,
    pack_region_phrases,
    pack_width,
    wants_packing,
)

EOT = 3


def _occupancy(lengths, rows, cols, count, width):
    occ = np.zeros((count, width), int)
    for n, r, c in zip(lengths, rows, cols, strict=True):
        assert 0 <= c and c + n <= width
        occ[r, c : c + n] += 1
    return occ


@pytest.mark.parametrize("low, high", [(3, 8), (1, 17), (8, 9), (15, 17)])
def test_fill_rows_places_every_item_once_and_fills_rows(low, high):
    rng = np.random.default_rng(low)
    lengths = rng.integers(low, high, 500)
    rows, cols, segments, count = fill_rows(lengths, 16)
    occ = _occupancy(lengths, rows, cols, count, 16)
    for r in range(count):  # segments number a row's items 1, 2, ... from its left end
        mine = np.flatnonzero(rows == r)
        assert sorted(segments[mine]) == list(range(1, len(mine) + 1))
        assert (np.argsort(cols[mine]) == np.argsort(segments[mine])).all()
    assert occ.max() == 1 and occ.sum() == lengths.sum()  # no overlap, every token placed
    bound = -(-lengths.sum() // 16)
    if high > 9:  # a row holds at most one item of >= 9 tokens
        bound = max(bound, int((lengths >= 9).sum()))
    assert count <= bound * 1.03 + 1, (count, bound)  # near the lower bound (BFD: ~8% over at 3-7)


def _phrase_batch(rng, b=4, m=3, t=16, shared_first=True, vocab=64):
    rtext = np.zeros((b, m, t), np.int32)
    for i, j in np.ndindex(b, m):
        n = int(rng.integers(1, 9))
        rtext[i, j, : n + 2] = [1, *rng.integers(4, vocab, n), EOT]
    rtext[0, 1] = rng.integers(4, vocab, t)  # no EOT: pooled at its last token
    rtext[0, 1, 0] = 1
    if not shared_first:
        rtext[1, 0, 0] = 2
    valid = np.ones((b, m), bool)
    valid[2, 1:] = False
    rtext[2, 1:] = 0
    return rtext, valid


@pytest.mark.parametrize("shared_first", [True, False])
def test_packed_phrases_embed_as_unpacked(shared_first):
    mc = load_model_config("tiny", micro_model(context_length=16, eot_token_id=EOT))
    model, params = CLIP(mc), init_params(mc, 0)
    rtext, valid = _phrase_batch(np.random.default_rng(0), shared_first=shared_first)
    pk = pack_region_phrases({"region_text": rtext, "region_valid": valid}, EOT)
    assert ("region_pack_sot" in pk) == shared_first
    assert "region_text" not in pk
    tokens = pk["region_pack_tokens"]
    real = (pk["region_pack_segments"] > 0).sum()
    first = int(shared_first)
    # every read phrase's tokens up to its EOT (less the shared first) and nothing else
    lengths = [int(np.argmax(r == EOT)) + 1 if (r == EOT).any() else len(r) for r in rtext[valid]]
    assert real == sum(lengths) - first * len(lengths)
    assert tokens.shape[1] == pack_width(16) == 24 and tokens.size < rtext.size
    want = model.apply({"params": params}, rtext.reshape(-1, 16), method=CLIP.encode_text)
    args = [
        pk[k]
        for k in ("region_pack_tokens", "region_pack_positions", "region_pack_segments", "region_pack_pool")
    ]
    got = model.apply({"params": params}, *args, pk.get("region_pack_sot"), method=CLIP.encode_text_packed)
    got = np.asarray(got)[pk["region_phrase_index"].reshape(-1)]
    np.testing.assert_allclose(got[valid.reshape(-1)], np.asarray(want)[valid.reshape(-1)], atol=2e-6, rtol=0)


def _assert_same_loss_and_gradients(model, params, mode, want_batch, got_batch, aux_key):
    """make_loss_fn on two batches of the same data: loss and `aux_key` to 1e-6, every
    gradient to 1e-5 of its scale (sums in another order)."""
    from clocmllm.encoder.trainer import DEFAULTS, deep_merge, make_loss_fn

    grad = jax.jit(
        jax.value_and_grad(make_loss_fn(model, deep_merge(DEFAULTS, {"mode": mode})), has_aux=True)
    )
    (l_want, aux_want), g_want = grad(params, want_batch)
    (l_got, aux_got), g_got = grad(params, got_batch)
    assert abs(float(l_want) - float(l_got)) <= 1e-6
    assert abs(float(aux_want[aux_key]) - float(aux_got[aux_key])) <= 1e-6

    def rel(a, c):
        return float(jnp.max(jnp.abs(a - c)) / max(1.0, float(jnp.max(jnp.abs(a)))))

    assert max(jax.tree.leaves(jax.tree.map(rel, g_want, g_got))) <= 1e-5
    return g_got


@pytest.mark.parametrize("dedup", [False, True])
def test_packed_region_phrases_give_the_same_cloc_loss_and_gradients(dedup):
    """Packing (after trimming, with or without de-duplication) is exact: same loss and
    gradients as the trimmed phrases, with repeated phrases, padded slots and a phrase
    without EOT."""
    mc = load_model_config("tiny", micro_model(context_length=16, eot_token_id=EOT))
    model, params = CLIP(mc), init_params(mc, 0)
    rng = np.random.default_rng(1)
    rtext, valid = _phrase_batch(rng)
    rtext[3] = rtext[1]  # repeats across images and within one: 7 distinct rows of 12
    rtext[0, 2] = rtext[0, 0]
    b, m, _ = rtext.shape
    text = np.zeros((b, 16), np.int32)
    text[:, :6] = [1, 5, 6, 7, 8, EOT]
    batch = {
        "images": rng.normal(size=(b, mc.image_size, mc.image_size, 3)).astype(np.float32),
        "text": text,
        "region_boxes": (rng.random((b, m, 4)) * 0.5 + [0, 0, 0.5, 0.5]).astype(np.float32),
        "region_valid": valid,
        "region_text": rtext,
    }
    trimmed = trim_region_text(batch, EOT)
    source = dedup_region_text(trimmed, align=2) if dedup else trimmed
    assert ("region_phrases" in source) == dedup
    packed = pack_region_phrases(source, EOT, align=2)
    assert len(packed["region_pack_tokens"]) % 2 == 0
    g_pack = _assert_same_loss_and_gradients(model, params, "cloc", trimmed, packed, "region_loss")
    # the packed pass did reach the text tower's weights (not a constant)
    assert float(jnp.abs(g_pack["text"]["layer_0"]["mlp"]["fc1"]["kernel"]).max()) > 0


def test_packer_shapes_only_grow_across_batches():
    """The trainer's `Packer`: a run's packed arrays take few shapes (one step compile
    each), the row count and width never shrinking."""
    rng = np.random.default_rng(0)
    packer, shapes = Packer("phrases", EOT), []
    for i in range(30):
        rtext, valid = _phrase_batch(rng, b=8, m=4, t=16 if i % 7 else 24)
        out = packer({"region_text": rtext, "region_valid": valid})
        shapes.append(out["region_pack_tokens"].shape)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(shapes, shapes[1:], strict=False))
    assert len(set(shapes)) <= 4, shapes
    assert shapes[-1][1] == pack_width(24) == 48  # widened for the 24-token batch, then kept


def _captions(rng, b, lengths, t=32, vocab=64):
    text = np.zeros((b, t), np.int32)
    for i in range(b):
        n = int(lengths[i])
        text[i, : n + 2] = [1, *rng.integers(4, vocab, n), EOT]
    return text


@pytest.mark.parametrize("mode", ["clip", "cloc"])
def test_packed_captions_give_the_same_loss_and_gradients(mode):
    """Captions of mixed length packed into rows (`pack_captions`): same CLIP / CLOC loss and
    gradients as the trimmed captions, in caption order (the contrastive loss reads it)."""
    from clocmllm.encoder.input_pipeline import trim_captions

    mc = load_model_config("tiny", micro_model(context_length=32, eot_token_id=EOT))
    model, params = CLIP(mc), init_params(mc, 0)
    rng = np.random.default_rng(2)
    b = 6
    text = _captions(rng, b, [20, 3, 9, 14, 2, 25])
    rtext, valid = _phrase_batch(rng, b=b, m=2, t=32)
    batch = {
        "images": rng.normal(size=(b, mc.image_size, mc.image_size, 3)).astype(np.float32),
        "text": text,
        "region_boxes": (rng.random((b, 2, 4)) * 0.5 + [0, 0, 0.5, 0.5]).astype(np.float32),
        "region_valid": valid,
        "region_text": rtext,
    }
    if mode == "clip":
        batch = {k: batch[k] for k in ("images", "text")}
    trimmed = trim_captions(batch, EOT)
    packed = pack_captions(trimmed, EOT)
    assert "text" not in packed and "text_pack_sot" in packed
    assert packed["text_pack_segments"].max() >= 3  # a row holds several captions
    from clocmllm.encoder.flops import batch_step_flops, packed_text_forward_flops, text_forward_flops

    rows, width = packed["text_pack_tokens"].shape  # the step's count follows the packed captions
    saved = text_forward_flops(mc, b, trimmed["text"].shape[1]) - packed_text_forward_flops(
        mc, rows, width, b, True
    )
    assert batch_step_flops(mc, trimmed) - batch_step_flops(mc, packed) == 3 * saved
    _assert_same_loss_and_gradients(model, params, mode, trimmed, packed, "clip_loss")


def test_captions_are_packed_only_once_it_pays_then_always():
    """`Packer('captions')`: captions of one length gain nothing and stay as they are; once a
    batch of mixed lengths saves >= 10% of the tokens, every later batch is packed (the
    step's shape does not flip back), in shapes that only grow."""
    rng = np.random.default_rng(3)
    packer = Packer("captions", EOT)
    same = {"text": _captions(rng, 32, np.full(32, 19), t=24)}  # 21 tokens each, as the bench's
    assert "text" in packer(same) and not packer.on
    mixed = {"text": _captions(rng, 32, rng.integers(7, 29, 32))}
    out = packer(mixed)
    assert (
        packer.on and "text_pack_tokens" in out and out["text_pack_tokens"].size <= 0.9 * mixed["text"].size
    )
    again = packer(same)
    assert "text_pack_tokens" in again and again["text_pack_tokens"].shape >= out["text_pack_tokens"].shape
    with pytest.raises(ValueError, match="captions"):
        Packer("words", EOT)


def test_auto_packs_from_a_text_width_of_256():
    assert wants_packing("auto", 384) and wants_packing("auto", 256) and not wants_packing("auto", 64)
    assert wants_packing(True, 64) and not wants_packing(False, 512)
    with pytest.raises(ValueError, match="auto"):
        wants_packing("yes", 384)
