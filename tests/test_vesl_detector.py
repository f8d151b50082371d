"""VESL detector stage: torch NMS, OWLv2's pad-to-square box geometry, parity with transformers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from clocmllm.boxes import iou
from clocmllm.vesl.detector import OwlDetector, owl_boxes_to_pixels, preprocess_images
from clocmllm.vesl.nms import batched_nms, nms
from clocmllm.vesl.random_owl import build_random_owl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _reference_nms(boxes: list, scores: list, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def test_nms_matches_reference_and_labels_are_separate() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    wh = torch.rand(60, 2, generator=g) * 30 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(60, generator=g)
    got = nms(boxes, scores, 0.4).tolist()
    assert got == _reference_nms(boxes.tolist(), scores.tolist(), 0.4)
    assert 0 < len(got) < 60
    # the same box under two labels survives twice; under one label once
    two = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    assert len(batched_nms(two, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)) == 2
    assert batched_nms(two, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), 0.5).tolist() == [0]


def test_owlv2_boxes_map_through_the_padded_square() -> None:
    # A 200x100 image is padded to 200x200: unit y of 0.5 is pixel 100 (the image's bottom edge).
    cxcywh = torch.tensor([[0.5, 0.25, 0.5, 0.5], [0.5, 0.75, 0.2, 0.2]])
    px = owl_boxes_to_pixels(cxcywh, 200, 100, pad_square=True)
    assert px[0].tolist() == pytest.approx([50.0, 0.0, 150.0, 100.0])
    assert px[1, 3] == px[1, 1] == 100.0  # wholly in the padding: zero height after clipping
    # OWL-ViT stretches: unit y 0.25..0.75 is pixel 25..75
    st = owl_boxes_to_pixels(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), 200, 100, pad_square=False)
    assert st[0].tolist() == pytest.approx([50.0, 25.0, 150.0, 75.0])


@pytest.fixture(scope="module")
def owl_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("owl")
    return build_random_owl(root / "owlv2"), build_random_owl(root / "owlvit", kind="owlvit")


def _photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.rocket())  # 640x427: not square


def test_preprocessing_matches_processor_geometry(owl_dirs) -> None:
    det = OwlDetector(owl_dirs[0], image_size=64)
    img = _photo()
    ours = preprocess_images([img], 64, det.mean, det.std, pad_square=True)[0]
    det.exact_preprocessing = True
    theirs = det.pixel_values([img])[0]
    assert ours.shape == theirs.shape == (3, 64, 64)
    # rows below 427/640*64 = 42.7 are padding (0 before normalising) in both
    pad_value = (-torch.tensor(det.mean) / torch.tensor(det.std))[:, None]
    assert torch.allclose(ours[:, 44:, :].flatten(1).mean(1), pad_value[:, 0], atol=1e-4)
    assert torch.allclose(theirs[:, 44:, :].flatten(1).mean(1), pad_value[:, 0], atol=1e-4)
    corr = np.corrcoef(ours[:, :42].flatten().numpy(), theirs[:, :42].flatten().numpy())[0, 1]
    assert corr > 0.97


@pytest.mark.parametrize("pad_square", [True, False], ids=["pad", "stretch"])
def test_uint8_preprocessing_is_within_one_level_of_float(pad_square: bool) -> None:
    """The uint8 resize (fast path) against the same pad + antialiased resize done in float32."""
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    images = [
        _photo(),
        _photo().convert("L").crop((0, 0, 300, 200)),
        Image.new("RGB", (20, 30), (9, 99, 199)),
    ]
    ours = preprocess_images(images, 64, mean, std, pad_square)
    for img, got in zip(images, ours, strict=True):
        x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255
        h, w = x.shape[1:]
        if pad_square:
            x = torch.nn.functional.pad(x, (0, max(h, w) - w, 0, max(h, w) - h))
        x = torch.nn.functional.interpolate(x[None], size=(64, 64), mode="bilinear", antialias=True)[0]
        want = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        levels = ((got - want).abs() * torch.tensor(std)[:, None, None] * 255).max()
        assert levels <= 1.0 + 1e-3  # rounding to uint8, nothing more


@pytest.mark.parametrize("which", [0, 1], ids=["owlv2", "owlvit"])
def test_boxes_match_transformers_post_processing(owl_dirs, which: int) -> None:
    det = OwlDetector(owl_dirs[which], image_size=64, threshold=0.0, nms_iou=1.0, exact_preprocessing=True)
    img = _photo()
    phrases = [["rocket", "blue sky", "smoke"]]
    logits, boxes = det.raw([img], phrases)
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

    hf = det.processor.image_processor.post_process_object_detection(
        Owlv2ObjectDetectionOutput(logits=logits, pred_boxes=boxes),
        threshold=0.0,
        target_sizes=[img.size[::-1]],
    )[0]
    ours = det.detect([img], phrases)[0]
    assert len(ours) > 0
    hf_boxes = hf["boxes"].clamp(min=0)
    hf_boxes = torch.minimum(hf_boxes, torch.tensor([640.0, 427, 640, 427]))
    for d in ours:  # every box we keep is one of transformers' boxes, with its label and score
        match = (hf_boxes - torch.tensor(d.box)).abs().max(dim=1).values < 0.02
        assert match.any()
        j = int(match.nonzero()[0])
        assert phrases[0][int(hf["labels"][j])] == d.phrase
        assert float(hf["scores"][j]) == pytest.approx(d.score, abs=1e-4)
    if which == 0:  # OWLv2: the square's bottom rows are padding, so fewer boxes survive than patches
        assert len(ours) < logits.shape[1]


def test_threshold_and_empty_phrases(owl_dirs) -> None:
    det = OwlDetector(owl_dirs[0], image_size=64, threshold=0.5)
    img = _photo()
    res = det.detect([img, img], [["rocket", "smoke"], []])
    assert res[1] == []
    assert all(d.score >= 0.5 for d in res[0])
    w, h = img.size
    assert all(0 <= d.box[0] < d.box[2] <= w and 0 <= d.box[1] < d.box[3] <= h for d in res[0])
    det.threshold = 1.01
    assert det.detect([img], [["rocket"]]) == [[]]
