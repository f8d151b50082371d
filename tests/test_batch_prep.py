"""The trainer's host batch preparation (encoder/batch_prep.py): its shape floors resume exactly,
bad saved floors are refused by name, and the loader's producer thread applies it in step order."""

from __future__ import annotations

import numpy as np
import pytest

from clocmllm.encoder.batch_prep import BatchPrep, PrepSettings
from clocmllm.encoder.input_pipeline import BatchIterator

EOT = 3
ALL_ON = PrepSettings(
    eot_token_id=EOT, trim_captions=True, trim_phrases=True, dedup_phrases=True, pack_phrases=True,
    pack_captions=True,
)  # fmt: skip


def _batch(rng, b=8, m=2, t=32, rt=16, longest=None):
    """Captions and phrases with first EOTs at random places, phrases repeating: each batch
    needs its own lengths and row counts, so the floors matter."""
    text = rng.integers(4, 60, (b, t)).astype(np.int32)
    ends = rng.integers(2, t if longest is None else longest, b)
    text[np.arange(b), ends] = EOT
    pool = []
    for _ in range(5):
        n = int(rng.integers(1, 12))
        pool.append([1, *rng.integers(4, 60, n), EOT])
    rtext = np.zeros((b, m, rt), np.int32)
    for i, j in np.ndindex(b, m):
        p = (
            pool[int(rng.integers(len(pool)))]
            if rng.random() < 0.5
            else [1, *rng.integers(4, 60, int(rng.integers(1, 12))), EOT]
        )
        rtext[i, j, : len(p)] = p
    return {
        "images": np.zeros((b, 4, 4, 3), np.float32),
        "text": text,
        "region_text": rtext,
        "region_valid": rng.random((b, m)) < 0.9,
        "region_boxes": np.zeros((b, m, 4), np.float32),
    }


def _batches(n=12, seed=0):
    rng = np.random.default_rng(seed)
    # long captions early, short ones late: a fresh floor would cut the late ones shorter
    return [_batch(rng, longest=30 if i < 4 else 10) for i in range(n)]


def _shapes(batch):
    return {k: v.shape for k, v in batch.items()}


def test_a_prep_loaded_with_the_saved_floors_continues_as_the_uninterrupted_one():
    batches = _batches()
    whole = BatchPrep(ALL_ON)
    ref = [whole(b) for b in batches]
    first = BatchPrep(ALL_ON)
    for b in batches[:6]:
        first(b)
    saved = first.state_dict()
    assert saved["caption_len"] > 0 and saved["phrase_pack"]["rows"] > 0 and saved["caption_pack"]["on"]
    resumed = BatchPrep(ALL_ON)
    resumed.load_state_dict(saved)
    fresh = BatchPrep(ALL_ON)
    differs = False
    for b, want in zip(batches[6:], ref[6:], strict=True):
        got = resumed(b)
        assert _shapes(got) == _shapes(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        differs |= _shapes(fresh(b)) != _shapes(want)
    assert differs  # without the floors the shapes (so the compiled programs) would differ
    assert resumed.state_dict() == whole.state_dict()


def test_phrase_and_caption_lengths_only_grow_over_a_run():
    trim_only = PrepSettings(eot_token_id=EOT, trim_captions=True, trim_phrases=True)
    prep = BatchPrep(trim_only)
    lengths = [
        (out["text"].shape[-1], out["region_text"].shape[-1]) for out in map(prep, _batches(20, seed=1))
    ]
    fresh = [BatchPrep(trim_only)(b)["region_text"].shape[-1] for b in _batches(20, seed=1)]
    assert len(set(fresh)) > 1 and sorted(fresh) != fresh  # the batches alone would go up and down
    for (c0, p0), (c1, p1) in zip(lengths[:-1], lengths[1:], strict=True):
        assert c1 >= c0 and p1 >= p0, lengths
    assert prep.state_dict()["phrase_len"] == lengths[-1][1] == max(fresh)


def test_an_old_checkpoint_without_floors_starts_from_zero():
    prep = BatchPrep(ALL_ON)
    prep.load_state_dict(None)
    prep.load_state_dict({})
    assert prep.state_dict() == BatchPrep(ALL_ON).state_dict()


@pytest.mark.parametrize(
    "state, field",
    [
        ({"caption_len": -1}, "prep.caption_len"),
        ({"caption_len": 2.5}, "prep.caption_len"),
        ({"phrase_len": -4}, "prep.phrase_len"),
        ({"dedup_rows": "8"}, "prep.dedup_rows"),
        ({"phrase_pack": {"rows": True}}, "prep.phrase_pack.rows"),
        ({"caption_pack": {"rows": 1, "on": 1}}, "prep.caption_pack.on"),
        ({"phrase_pack": [4, 16]}, "prep.phrase_pack"),
    ],
)
def test_bad_saved_floors_are_refused_by_name(state, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        BatchPrep(ALL_ON).load_state_dict(state)


def test_settings_follow_the_config():
    from clocmllm.encoder.trainer import DEFAULTS, deep_merge

    cfg = deep_merge(DEFAULTS, {"mode": "cloc"})
    s = BatchPrep.from_config(cfg, text_width=64, eot_token_id=EOT, devices=8, processes=1).settings
    assert (s.trim_captions, s.trim_phrases, s.dedup_phrases, s.pack_phrases, s.pack_captions) == (
        True, True, True, False, False,
    )  # fmt: skip
    assert s.align == 8
    assert BatchPrep.from_config(cfg, 256, EOT, 1, 1).settings.pack_phrases  # `auto` from width 256
    multi = BatchPrep.from_config(cfg, 256, EOT, 1, 2).settings  # every host must see one shape
    assert not (multi.trim_captions or multi.trim_phrases or multi.dedup_phrases or multi.pack_phrases)
    clip = BatchPrep.from_config(deep_merge(DEFAULTS, {"mode": "clip"}), 256, EOT, 1, 1).settings
    assert clip.trim_captions and not (clip.trim_phrases or clip.pack_phrases)
    rocket = BatchPrep.from_config(deep_merge(DEFAULTS, {"mode": "cloc", "recipe": "rocket"}), 256, EOT, 1, 1)
    assert not (rocket.settings.trim_captions or rocket.settings.dedup_phrases)


class _ListDataset:
    """What BatchIterator needs of a RegionDataset: batch(step, pool) and cfg."""

    def __init__(self, batches):
        from clocmllm.encoder.input_pipeline import PipelineConfig

        self.batches = batches
        self.cfg = PipelineConfig(image_size=4, batch_size=8, num_regions=2, threads=1, prefetch=3)

    def batch(self, step, pool=None):
        return self.batches[step]


def test_the_loader_thread_prepares_batches_in_step_order_and_reports_their_floors():
    batches = _batches()
    ref = BatchPrep(ALL_ON)
    it = BatchIterator(_ListDataset(batches), start_step=0, prepare=BatchPrep(ALL_ON))
    try:
        for i in range(len(batches)):
            got = next(it)
            want = ref(batches[i])
            assert _shapes(got) == _shapes(want), i
            np.testing.assert_array_equal(got["text_pack_tokens"], want["text_pack_tokens"])
            # the floors after this batch, though the thread has prepared later ones already
            assert it.prep_state == ref.state_dict(), i
    finally:
        it.close()


def test_an_error_in_preparation_reaches_the_consumer():
    def broken(batch):
        raise ValueError("bad batch")

    it = BatchIterator(_ListDataset(_batches(2)), prepare=broken)
    try:
        with pytest.raises(ValueError, match="bad batch"):
            next(it)
    finally:
        it.close()
