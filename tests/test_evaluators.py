"""Zero-shot evaluators: RoI-Align against a naive loop, recall@k, and `clocmllm eval encoder`
end to end on a params-only checkpoint (save_params -> restore_params -> JSON)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest


def naive_roi(fmap, box, out, sampling):
    """Straight loops over bins and sample points, torchvision aligned=True semantics."""
    h, w, c = fmap.shape
    x1, y1, x2, y2 = box[0] * w - 0.5, box[1] * h - 0.5, box[2] * w - 0.5, box[3] * h - 0.5
    bw, bh = (x2 - x1) / out, (y2 - y1) / out
    res = np.zeros((out, out, c))
    for i in range(out):
        for j in range(out):
            acc = np.zeros(c)
            for si in range(sampling):
                for sj in range(sampling):
                    y = y1 + (i + (si + 0.5) / sampling) * bh
                    x = x1 + (j + (sj + 0.5) / sampling) * bw
                    if y < -1 or y > h or x < -1 or x > w:
                        continue
                    y, x = min(max(y, 0), h - 1), min(max(x, 0), w - 1)
                    y0, x0 = int(np.floor(y)), int(np.floor(x))
                    y1_, x1_ = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                    ly, lx = y - y0, x - x0
                    acc += (
                        (1 - ly) * (1 - lx) * fmap[y0, x0]
                        + (1 - ly) * lx * fmap[y0, x1_]
                        + ly * (1 - lx) * fmap[y1_, x0]
                        + ly * lx * fmap[y1_, x1_]
                    )
            res[i, j] = acc / sampling**2
    return res


def test_roi_align_matches_naive_loop():
    from clocmllm.encoder.roi_align import roi_align, roi_pool_tokens

    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(5, 7, 3)).astype(np.float32)
    boxes = np.asarray(
        [[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0], [0.33, 0.41, 0.38, 0.47], [0.8, 0.1, 0.99, 0.3]],
        np.float32,
    )
    got = np.asarray(roi_align(fmap, boxes, out=3, sampling=2))
    want = np.stack([naive_roi(fmap, b, 3, 2) for b in boxes])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # tokens with a class token: the class token is ignored, patches form the grid
    tokens = np.concatenate([np.full((1, 1, 3), 1e3, np.float32), fmap[:5, :5].reshape(1, 25, 3)], axis=1)
    pooled = np.asarray(roi_pool_tokens(tokens, boxes[None, :2], out=2, sampling=2))
    want2 = np.stack([naive_roi(fmap[:5, :5], b, 2, 2).mean((0, 1)) for b in boxes[:2]])
    np.testing.assert_allclose(pooled[0], want2, rtol=1e-5, atol=1e-5)


def test_recall_at_k_text_match():
    from clocmllm.encoder.evaluators.retrieval import mean_class_accuracy, recall_at_k

    keys = np.eye(4)
    queries = np.asarray([[1, 0, 0, 0], [0, 0.9, 0.5, 0], [0, 0, 0, 1.0]], float)
    r = recall_at_k(queries, keys, ["a", "c", "x"], ["a", "b", "c", "x"], ks=(1, 2))
    assert r[1] == pytest.approx(2 / 3) and r[2] == pytest.approx(1.0)
    # a duplicate text elsewhere counts as a hit
    r = recall_at_k(queries[:1], keys, ["b"], ["b", "b", "c", "x"], ks=(1,))
    assert r[1] == 1.0
    assert mean_class_accuracy(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(0.75)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import jax

    from clocmllm.data.world import generate_world
    from clocmllm.encoder.checkpoints import save_params
    from clocmllm.encoder.config import load_model_config
    from clocmllm.encoder.input_pipeline import load_records
    from clocmllm.encoder.models.clip import init_params
    from clocmllm.encoder.tokenizer import build_word_tokenizer, tokenizer_overrides

    root = tmp_path_factory.mktemp("evalckpt")
    generate_world(root / "world", train=0, eval=6, seed=3, image_size=32, progress=False)
    recs = load_records(root / "world", "eval")
    tok = build_word_tokenizer(
        [r.caption for r in recs] + [g.text for r in recs for g in r.regions],
        root / "run" / "tokenizer.json",
        context_length=12,
    )
    micro = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64,
                 text_width=32, text_layers=1, text_heads=2, text_mlp_dim=64, embed_dim=32, prompter_freqs=4)  # fmt: skip
    mc = load_model_config("tiny", {**micro, **tokenizer_overrides(tok)})
    params = init_params(mc, 0)
    config = {"mode": "cloc", "model": mc.to_dict(), "tokenizer": "tokenizer.json"}
    path = save_params(root / "run", config, params, 7)
    return root, path, params, jax


def test_save_restore_params_roundtrip(checkpoint, caplog):
    from clocmllm.encoder.checkpoints import restore_params

    root, path, params, jax = checkpoint
    for p in (root / "run", path):
        with caplog.at_level("WARNING"):
            cfg, restored, step = restore_params(p)
        # a restore of a sound checkpoint is silent (orbax warned of a missing metadata file
        # when the item folder was read with a standalone Checkpointer)
        assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
        assert step == 7 and cfg["mode"] == "cloc"
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True):
            assert isinstance(b, np.ndarray)
            np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(FileNotFoundError):
        restore_params(root / "world")


def test_eval_encoder_cli_writes_all_metrics(checkpoint):
    from clocmllm.commands import eval_encoder

    root, path, _, _ = checkpoint
    parser = argparse.ArgumentParser()
    eval_encoder.add_arguments(parser)
    results = {}
    for regions in ("prompter", "roi"):
        out = root / f"{regions}.json"
        args = parser.parse_args(["--checkpoint", str(root / "run"), "--data", str(root / "world"), "--json", str(out), "--regions", regions, "--batch-size", "4"])  # fmt: skip
        assert eval_encoder.run(args) == 0
        results[regions] = json.loads(out.read_text())
    m = results["prompter"]
    for key in ("image_text_r1", "image_text_r5", "region_retrieval_r1", "region_retrieval_r10", "region_cls_acc",
                "region_retrieval_r2t_r1", "region_retrieval_t2r_r10", "image_text_i2t_r1", "zero_shot_acc"):  # fmt: skip
        assert 0.0 <= m[key] <= 1.0, key
    assert m["num_images"] == 6 and m["step"] == 7
    assert m["image_text_r5"] >= m["image_text_r1"] and m["region_retrieval_r10"] >= m["region_retrieval_r1"]
    # image metrics do not depend on the region source; region metrics do
    assert m["image_text_r1"] == results["roi"]["image_text_r1"]
    assert (
        m["region_retrieval_r10"] != results["roi"]["region_retrieval_r10"]
        or m["region_cls_acc"] != results["roi"]["region_cls_acc"]
    )
