"""LCL: interleaved reader, paired->interleaved, sequence masking, losses vs numpy, learning.

Jitted functions are compiled once per module at XLA optimisation level 0 (see test_rocket).
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import optax
import pytest
from micro import micro_model
from PIL import Image

from clocmllm.data.interleaved import (
    InterleavedDoc,
    Segment,
    paired_to_interleaved,
    read_interleaved_jsonl,
    write_interleaved_jsonl,
)
from clocmllm.data.problems import DataError, ProblemLog
from clocmllm.encoder.config import load_model_config
from clocmllm.encoder.models.clip import CLIP, init_params
from clocmllm.encoder.recipes import lcl

FAST_COMPILE = {"xla_backend_optimization_level": 0}
S = 16


@pytest.fixture(scope="module")
def mc():
    return load_model_config("tiny", micro_model(image_size=S, embed_dim=16, vocab_size=40, context_length=8))


# ---------------------------------------------------------------- data
def test_reader_validates_with_file_line_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        {"segments": [{"text": "a red circle"}, {"image": "a.png"}], "url": "x"},
        {"segments": []},
        {"segments": [{"text": "t", "image": "b.png"}]},
        {"segments": [{"text": "ok"}, {"image": ""}]},
        "not json",
    ]
    path.write_text("\n".join(ln if isinstance(ln, str) else json.dumps(ln) for ln in lines) + "\n")
    problems = ProblemLog()
    docs = read_interleaved_jsonl(path, problems)
    assert len(docs) == 1 and docs[0].extra == {"url": "x"}
    assert docs[0].image_path(docs[0].segments[1]) == str(tmp_path / "a.png")
    where = [(p.line, p.field) for p in problems.problems]
    assert where == [(2, "segments"), (3, "segments[0]"), (4, "segments[1].image"), (5, None)]
    with pytest.raises(DataError, match=r"docs.jsonl:2: segments"):
        read_interleaved_jsonl(path, ProblemLog(strict=True))
    out = tmp_path / "copy.jsonl"
    assert write_interleaved_jsonl(docs, out) == 1
    assert read_interleaved_jsonl(out)[0].to_json() == docs[0].to_json()


def test_paired_to_interleaved_is_seeded_and_mixes_orders():
    pairs = [(f"{i}.png", f"caption {i}") for i in range(40)]
    a = paired_to_interleaved(pairs, seed=3)
    b = paired_to_interleaved(pairs, seed=3)
    c = paired_to_interleaved(pairs, seed=4)
    first = [d.segments[0].is_image for d in a]
    assert [d.to_json() for d in a] == [d.to_json() for d in b]
    assert first != [d.segments[0].is_image for d in c]
    assert 8 < sum(first) < 32  # both orders, about half each
    for d, (img, cap) in zip(a, pairs, strict=True):
        assert {s.image or s.text for s in d.segments} == {img, cap} and d.num_images == 1


def test_batch_masks_images_padding_and_position_zero(mc):
    ids = lcl.special_ids(mc)
    k = mc.num_image_tokens  # 5
    img = np.ones((S, S, 3), np.float32)
    docs = [
        [("image", img), ("text", [5, 6, 7])],  # image at position 0: no contrastive term
        [("text", [8, 9]), ("image", 2 * img), ("text", [10])],
        [("text", list(range(10, 30)))],  # truncated to the sequence
        [("text", [11]), ("image", img), ("image", img)],  # second image does not fit: dropped
    ]
    seq = 12
    out = lcl.build_lcl_batch(docs, seq, k, max_images=4, ids=ids, image_shape=(S, S, 3))
    lm, pos, mask = out["lm_ids"], out["lm_image_pos"], out["lm_loss_mask"]
    assert lm[0, 0] == ids.img_start and lm[0, k + 1] == ids.img_end
    assert list(pos[0, 1 : k + 1]) == list(range(k)) and list(pos[1, 3 : k + 3]) == list(range(k, 2 * k))
    assert out["image_valid"].tolist() == [True, True, True, False]
    assert out["image_start"].tolist()[:3] == [0, seq + 2, 3 * seq + 1]
    assert out["image_contrast"].tolist() == [False, True, True, False]
    np.testing.assert_array_equal(out["images"][1], 2 * img)
    # targets: only text tokens are predicted (never <img>, image tokens, </img> or padding)
    target_is_text = np.zeros_like(mask)
    target_is_text[0, k + 1 : k + 4] = True  # </img> predicts 5, then 6, 7
    target_is_text[1, [0, k + 3]] = True  # 8 -> 9, and </img> (at 2 + k + 1) -> 10
    target_is_text[2, : seq - 1] = True
    np.testing.assert_array_equal(mask, target_is_text)
    assert lm[2, -1] == 21 and not (mask & (pos >= 0)).any()


def test_dataset_reads_images_and_reports_bad_ones(tmp_path, mc):
    Image.new("RGB", (20, 10), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    docs = [
        InterleavedDoc([Segment(text="a red box"), Segment(image="a.png")], root=str(tmp_path)),
        InterleavedDoc([Segment(image="bad.png"), Segment(text="broken")], root=str(tmp_path)),
    ]
    encode = lambda text: [4 + len(w) for w in text.split()]  # noqa: E731
    cfg = lcl.Config(seq_len=12)
    problems = ProblemLog()
    ds = lcl.LCLDataset(docs, cfg, mc, encode, batch_size=2, seed=0, problems=problems)
    b0, b0_again = ds.batch(0), ds.batch(0)
    assert all(np.array_equal(b0[key], b0_again[key]) for key in b0)
    assert b0["lm_ids"].shape == (2, 12) and b0["images"].shape == (2, S, S, 3)
    assert b0["image_valid"].sum() == 1 and b0["image_contrast"].sum() == 1
    assert any("bad.png" in p.file and p.field == "image" for p in problems.problems)
    with pytest.raises(DataError, match="bad.png"):
        lcl.LCLDataset(docs, cfg, mc, encode, 2, problems=ProblemLog(strict=True)).batch(0)

    # two hosts, one slice each: flat indices address the assembled global arrays
    good = [docs[0], InterleavedDoc([Segment(image="a.png"), Segment(text="red")], root=str(tmp_path))]
    parts = [
        lcl.LCLDataset(good, cfg, mc, encode, 2, process_index=h, process_count=2).batch(3) for h in (0, 1)
    ]
    glob = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert glob["lm_ids"].shape == (2, 12) and glob["images"].shape == (2, S, S, 3)
    starts = glob["image_start"][glob["image_valid"]]
    assert len(starts) == 2 and (glob["lm_ids"].reshape(-1)[starts] == lcl.special_ids(mc).img_start).all()
    slots = np.unique(glob["lm_image_pos"][glob["lm_image_pos"] >= 0] // mc.num_image_tokens)
    assert glob["image_valid"][slots].all() and len(slots) == 2


# ---------------------------------------------------------------- losses
def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_losses_match_numpy_reference():
    r = np.random.default_rng(0)
    a, b = r.normal(size=(6, 8)), r.normal(size=(6, 8))
    valid = np.asarray([True, False, True, True, False, True])
    # one compiled call each (eager jnp would compile every primitive separately)
    nce = jax.jit(lcl.masked_info_nce, compiler_options=FAST_COMPILE)
    ntl = jax.jit(lcl.next_token_loss, compiler_options=FAST_COMPILE)
    got = float(nce(a.astype(np.float32), b.astype(np.float32), valid, np.log(10.0)))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    idx = np.flatnonzero(valid)
    logits = 10.0 * an[idx] @ bn[idx].T
    want = -0.5 * (np.diag(np_log_softmax(logits)).mean() + np.diag(np_log_softmax(logits.T)).mean())
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(nce(a.astype(np.float32), b.astype(np.float32), np.zeros(6, bool), 0.0)) == 0.0

    logits = r.normal(size=(2, 5, 7)).astype(np.float32)
    ids = r.integers(0, 7, (2, 5)).astype(np.int32)
    mask = r.random((2, 5)) > 0.4
    mask[0, 0] = True
    got = float(ntl(logits, ids, mask))
    terms = [
        -np_log_softmax(logits[i, t].astype(np.float64))[ids[i, t + 1]]
        for i in range(2)
        for t in range(4)
        if mask[i, t]
    ]
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


# ---------------------------------------------------------------- model + learning
def test_lcl_loss_learns_and_trains_the_vision_tower(mc):
    cfg = lcl.Config.from_dict(
        {
            "seq_len": 16,
            "lm": {"width": 32, "layers": 1, "heads": 2, "mlp_dim": 64, "max_len": 16, "pooler_heads": 2},
        }
    )
    model = CLIP(mc)
    params = init_params(mc, 0)
    params[lcl.PARAM_KEY] = lcl.init_extra_params(jax.random.key(1), mc, cfg)
    r = np.random.default_rng(0)
    docs = []
    for i in range(6):
        img = ("image", r.normal(size=(S, S, 3)).astype(np.float32))
        txt = ("text", [int(x) for x in r.integers(4, mc.vocab_size, 5)])
        docs.append([txt, img, ("text", [7])] if i % 3 else [img, txt])
    batch = lcl.build_lcl_batch(docs, cfg.seq_len, mc.num_image_tokens, 8, lcl.special_ids(mc), (S, S, 3))
    assert batch["image_contrast"].sum() == 4

    loss_fn = lcl.make_loss_fn(model, cfg)
    tx = optax.adam(3e-3)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(p, opt, bt):
        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, bt)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, metrics

    p, opt, m0 = step(params, tx.init(params), batch)
    np.testing.assert_allclose(
        float(m0["loss"]), 0.1 * float(m0["lcl_contrastive_loss"]) + float(m0["lcl_lm_loss"]), rtol=1e-6
    )
    # what sits in the placeholder positions of lm_ids is irrelevant: image tokens replace it
    _, _, m_same = step(
        params, tx.init(params), {**batch, "lm_ids": np.where(batch["lm_image_pos"] >= 0, 9, batch["lm_ids"])}
    )
    np.testing.assert_allclose(float(m_same["loss"]), float(m0["loss"]), rtol=1e-6)
    for _ in range(40):
        p, opt, m = step(p, opt, batch)
    assert float(m["lcl_lm_loss"]) < 0.5 * float(m0["lcl_lm_loss"])
    assert float(m["lcl_contrastive_loss"]) < 0.8 * float(m0["lcl_contrastive_loss"])
    assert not np.allclose(p["visual"]["patch_embed"]["kernel"], params["visual"]["patch_embed"]["kernel"])
    # the text tower is not part of LCL: it gets no gradient, so Adam leaves it unchanged
    np.testing.assert_array_equal(p["text"]["proj"]["kernel"], params["text"]["proj"]["kernel"])


def test_config_from_dict():
    cfg = lcl.Config.from_dict({"lam": 0.2, "lm": {"width": 64, "heads": 4}})
    assert cfg.lam == 0.2 and cfg.lm.width == 64
    with pytest.raises(ValueError, match="r.yaml: lm: unknown LM field 'depth'"):
        lcl.Config.from_dict({"lm": {"depth": 2}}, "r.yaml")
    with pytest.raises(ValueError, match="heads=3 does not divide"):
        lcl.Config.from_dict({"lm": {"width": 64, "heads": 3}})
    with pytest.raises(ValueError, match="exceeds lm.max_len"):
        lcl.Config.from_dict({"seq_len": 512})


def test_tiny_recipe_section_parses(mc):
    import pathlib

    import yaml

    path = pathlib.Path(__file__).parents[1] / "scripts" / "recipes" / "tiny_lcl.yaml"
    recipe = yaml.safe_load(path.read_text())
    cfg = lcl.Config.from_dict(recipe["lcl"], str(path))
    tiny = load_model_config(recipe["model"]["preset"])
    assert recipe["recipe"] == "lcl" and cfg.seq_len >= tiny.num_image_tokens + 3
    shapes = jax.eval_shape(lambda: lcl.init_extra_params(jax.random.key(0), tiny, cfg))
    assert shapes["pos_embed"].shape == (cfg.lm.max_len, cfg.lm.width)
    assert shapes["img_in"]["kernel"].shape == (tiny.vision_width, cfg.lm.width)
