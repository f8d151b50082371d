"""clip-rocket's numpy side: strong views move boxes with the pixels; EDA caption ops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clocmllm.encoder.augment import StrongAugment, crop_boxes, make_views, strong_view
from clocmllm.encoder.caption_augment import STOP_WORDS, CaptionAugment, bundled_synonyms, synonyms
from clocmllm.encoder.recipes.rocket import Config, example_views

SIZE = 48


def scene(w: int = 120, h: int = 80, box=(30, 20, 70, 60)) -> tuple[Image.Image, np.ndarray]:
    """Dark image with one bright rectangle whose pixel box is `box`."""
    image = Image.new("RGB", (w, h), (10, 10, 10))
    x1, y1, x2, y2 = box
    ImageDraw.Draw(image).rectangle([x1, y1, x2 - 1, y2 - 1], fill=(250, 240, 230))  # covers [x1, x2)
    return image, np.asarray([box], np.float64)


def bright_bbox(pixels: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Pixel-edge bbox of the bright area (threshold half-way between the view's extremes)."""
    lum = pixels.astype(np.float64).mean(axis=-1)
    lo, hi = lum.min(), lum.max()
    if hi - lo < 20:
        return None
    ys, xs = np.nonzero(lum > (lo + hi) / 2)
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64), len(xs)


@pytest.mark.parametrize("aug", [StrongAugment().geometry_only(), StrongAugment()], ids=["geometry", "full"])
def test_boxes_cover_the_same_pixels_after_augmentation(aug):
    image, boxes = scene()
    checked = dropped_seen = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        view = strong_view(image, boxes, SIZE, rng, aug)
        assert view.pixels.shape == (SIZE, SIZE, 3) and view.pixels.dtype == np.uint8
        found = bright_bbox(view.pixels)
        if not view.valid[0]:
            dropped_seen += 1
            assert np.all(view.boxes[0] == 0)
            continue
        assert found is not None, f"seed {seed}: valid box but the rectangle is not in the view"
        bbox, count = found
        pred = view.boxes[0] * SIZE
        # edges agree up to resampling/blur (blur sigma <= 2*48/224 px)
        assert np.abs(bbox - pred).max() <= 1.6, (seed, bbox, pred)
        # the bright pixels fill the predicted box (no offset or scale error)
        area = (pred[2] - pred[0]) * (pred[3] - pred[1])
        assert abs(count - area) <= 2 * ((pred[2] - pred[0]) + (pred[3] - pred[1])) + 2, (seed, count, area)
        checked += 1
    assert checked >= 20 and dropped_seen >= 1


def test_crop_boxes_clip_and_drop():
    boxes = np.asarray([[0, 0, 10, 10], [8, 8, 30, 30], [90, 90, 100, 100]], np.float64)
    unit, valid = crop_boxes(boxes, (5, 5, 20, 20), size=20, min_visible=0.25)
    # first: visible [5,10]^2 = 25 of 100 -> kept at exactly the threshold
    np.testing.assert_allclose(unit[0], [0, 0, 0.25, 0.25])
    # second: clipped to the crop's right/bottom edge
    np.testing.assert_allclose(unit[1], [0.15, 0.15, 1.0, 1.0])
    assert valid.tolist() == [True, True, False]
    _, valid_strict = crop_boxes(boxes, (5, 5, 20, 20), size=20, min_visible=0.3)
    assert valid_strict.tolist() == [False, True, False]


def test_views_are_deterministic_given_seed():
    image, boxes = scene()
    a_weak, a = make_views(image, boxes, SIZE, 3, seed=[7, 1])
    b_weak, b = make_views(image, boxes, SIZE, 3, seed=[7, 1])
    _, c = make_views(image, boxes, SIZE, 3, seed=[7, 2])
    assert all(
        np.array_equal(x.pixels, y.pixels) and np.array_equal(x.boxes, y.boxes)
        for x, y in zip(a, b, strict=True)
    )
    assert any(not np.array_equal(x.pixels, y.pixels) for x, y in zip(a, c, strict=True))
    assert np.array_equal(a_weak.pixels, b_weak.pixels)
    # weak view = letterbox: the 120x80 image is scaled by 48/120, box [30,20,70,60] -> unit
    np.testing.assert_allclose(a_weak.boxes[0], np.asarray([30, 20, 70, 60]) * 0.4 / SIZE, atol=1e-6)
    # colour settings do not change geometry for the same seed
    g = strong_view(image, boxes, SIZE, np.random.default_rng(3), StrongAugment().geometry_only())
    f = strong_view(image, boxes, SIZE, np.random.default_rng(3), StrongAugment())
    assert np.array_equal(g.boxes, f.boxes)


def test_example_views_keep_invalid_regions_invalid():
    image, _ = scene()
    unit = np.asarray([[30, 20, 70, 60], [0, 0, 0, 0]], np.float32) * 0.4 / SIZE
    cfg = Config(num_views=4)
    out = example_views(
        image, "a bright box", unit, np.asarray([True, False]), SIZE, cfg, np.random.default_rng(0)
    )
    assert out["pixels"].shape == (4, SIZE, SIZE, 3) and out["boxes"].shape == (4, 2, 4)
    assert not out["valid"][:, 1].any() and len(out["captions"]) == 4


SENTENCE = "a picture of a small red circle and a large blue square on a dark gray background"


def test_eda_ops():
    aug = CaptionAugment(alpha=0.1, use_wordnet=False)
    words = SENTENCE.split()
    no_stop = aug.apply(SENTENCE, "stopwords", np.random.default_rng(0)).split()
    assert no_stop == [w for w in words if w not in STOP_WORDS] and "of" not in no_stop

    syn = aug.apply(SENTENCE, "synonym", np.random.default_rng(0)).split(" ")
    changed = [(a, b) for a, b in zip(SENTENCE.split(" "), syn, strict=False) if a != b]
    assert len(syn) >= len(words) and changed, "synonym replacement must change a word"
    table = bundled_synonyms()
    assert len(changed) <= max(1, round(0.1 * len(words)))
    for old, new in changed:
        assert old not in STOP_WORDS and new in [s.split()[0] for s in table[old]]

    swapped = aug.apply(SENTENCE, "swap", np.random.default_rng(0)).split()
    assert sorted(swapped) == sorted(words) and swapped != words

    deleted = aug.apply(SENTENCE, "delete", np.random.default_rng(5)).split()
    assert 1 <= len(deleted) < len(words)
    it = iter(words)
    assert all(w in it for w in deleted), "deletion keeps word order"
    assert aug.apply("circle", "delete", np.random.default_rng(0)) == "circle"

    # deterministic given the generator; one op per call
    assert aug(SENTENCE, np.random.default_rng(11)) == aug(SENTENCE, np.random.default_rng(11))
    with pytest.raises(ValueError, match="subset"):
        CaptionAugment(ops=("shuffle",))


def test_synonym_table_covers_the_world():
    from clocmllm.data.world_vocab import COLORS, SHAPES, SIZES

    for word in (*SHAPES, *COLORS, *SIZES, "background", "dark", "light"):
        assert synonyms(word, use_wordnet=False), word
    for key, values in bundled_synonyms().items():
        assert key not in values, key


def test_rocket_dataset_views_follow_boxes_through_the_pipeline(tmp_path):
    from clocmllm.data.regions import Region, RegionRecord
    from clocmllm.encoder.input_pipeline import PipelineConfig, RegionDataset
    from clocmllm.encoder.preprocess import CLIP_MEAN, CLIP_STD
    from clocmllm.encoder.recipes.rocket import RocketDataset

    records = []
    for i, box in enumerate([(30, 20, 70, 60), (5, 40, 60, 75), (80, 10, 115, 70)]):
        image, _ = scene(box=box)
        image.save(tmp_path / f"{i}.png")
        records.append(
            RegionRecord(
                f"{i}.png",
                "a bright box on a dark background",
                [Region(list(map(float, box)), "bright box")],
                120,
                80,
                root=str(tmp_path),
            )
        )
    tokenize = lambda texts: np.asarray(
        [[4 + len(w) % 9 for w in t.split()][:7] + [3] * (8 - min(7, len(t.split()))) for t in texts],
        np.int32,
    )  # noqa: E731
    cfg = PipelineConfig(image_size=SIZE, batch_size=3, num_regions=2, seed=1)
    ds = RocketDataset(RegionDataset(records, cfg, tokenize), Config(num_views=3), tokenize)
    a, again = ds.batch(2), ds.batch(2)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    assert a["aug_images"].shape == (3, 3, SIZE, SIZE, 3) and a["aug_text"].shape == (3, 3, 8)
    assert a["aug_region_boxes"].shape == (3, 3, 2, 4) and a["aug_region_valid"].shape == (3, 3, 2)
    assert not (a["aug_region_valid"] & ~a["region_valid"][:, None]).any()
    pixels = np.clip((a["aug_images"] * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN)) * 255, 0, 255)
    checked = 0
    for b in range(3):
        for v in range(3):
            if a["aug_region_valid"][b, v, 0]:
                found = bright_bbox(pixels[b, v])
                assert found is not None
                assert np.abs(found[0] - a["aug_region_boxes"][b, v, 0] * SIZE).max() <= 2.0
                checked += 1
    assert checked >= 3
