"""Box math: letterbox geometry, the 0–999 grid, and the answer parser's edge cases."""

import math

import pytest

from clocmllm.boxes import (
    Letterbox,
    box_problem,
    format_box,
    from_grid,
    grid_to_unit,
    iou,
    parse_boxes,
    to_grid,
    unit_to_grid,
)


@pytest.mark.parametrize("w,h,size", [(640, 480, 336), (300, 900, 224), (64, 64, 64), (1000, 10, 224)])
def test_letterbox_round_trip_and_padding(w, h, size):
    lb = Letterbox(w, h, size)
    box = [0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h]
    back = lb.from_model(lb.to_model(box))
    assert back == pytest.approx(box, abs=1e-6)
    # The long side fills the square; the short side is padded (so its unit coordinates < 1).
    full = lb.to_unit([0, 0, w, h])
    assert full[:2] == [0.0, 0.0]
    assert max(full[2], full[3]) == pytest.approx(1.0)
    assert min(full[2], full[3]) <= 1.0
    rw, rh = lb.resized
    assert max(rw, rh) == size


def test_letterbox_pads_right_and_bottom_only():
    lb = Letterbox(200, 100, 100)  # landscape: resized to 100x50, padded at the bottom
    assert lb.to_unit([0, 0, 200, 100]) == pytest.approx([0, 0, 1.0, 0.5])
    assert lb.from_unit([0.5, 0.25, 1.0, 0.5]) == pytest.approx([100, 50, 200, 100])
    # from_model clips anything in the padding back onto the image
    assert lb.from_model([0, 0, 100, 100]) == pytest.approx([0, 0, 200, 100])


def test_grid_round_trip_within_one_cell():
    w, h = 640, 480
    for box in ([0, 0, 640, 480], [10.5, 20.25, 300.0, 479.0], [123.0, 45.0, 124.0, 46.0]):
        for size in (None, 640):
            g = to_grid(box, w, h, size=size)
            assert all(0 <= c <= 999 for c in g)
            back = from_grid(g, w, h, size=size)
            cell_x = (w if size is None else max(w, h)) / 1000
            cell_y = (h if size is None else max(w, h)) / 1000
            for c, b, cell in zip(back, box, (cell_x, cell_y, cell_x, cell_y), strict=True):
                assert abs(c - b) <= cell + 1e-9
            assert to_grid(back, w, h, size=size) == g  # stable once on the grid


def test_grid_uses_letterbox_square_not_stretch():
    # A box at the bottom of a landscape image: letterboxed it sits in the top 3/4 of the square.
    stretched = to_grid([0, 0, 640, 480], 640, 480)
    letterboxed = to_grid([0, 0, 640, 480], 640, 480, size=640)
    assert stretched == [0, 0, 999, 999]
    assert letterboxed == [0, 0, 999, 750]


def test_unit_grid_clamps_and_centres():
    assert unit_to_grid([-0.2, 0.0, 1.0, 1.7]) == [0, 0, 999, 999]
    assert grid_to_unit([0, 999, -5, 2000]) == pytest.approx([0.0005, 0.9995, 0.0005, 0.9995])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("[1, 2, 30, 40]", [[1, 2, 30, 40]]),
        ("[ 1 ,2,   30 ,40 ]", [[1, 2, 30, 40]]),  # spacing
        ("box: [1.4, 2.6, 30.5, 40.49]", [[1, 3, 30, 40]]),  # decimals round (banker's at .5)
        ("[-20, 5, 1500, 40]", [[0, 5, 999, 40]]),  # negative and oversized clamp
        ("[30, 40, 1, 2]", [[1, 2, 30, 40]]),  # swapped corners
        ("[5, 5, 5, 9]", []),  # zero width
        ("[-3, 0, -1, 9]", []),  # zero width after clamping
        ("no box here", []),
        ("[1, 2, 3]", []),
        ("[a, b, c, d]", []),
        ("", []),
        ("[1,2,3,4] and [10, 20, 30, 40]", [[1, 2, 3, 4], [10, 20, 30, 40]]),
    ],
)
def test_parse_boxes(text, expected):
    assert parse_boxes(text) == expected


def test_format_then_parse_is_identity():
    box = [12, 0, 999, 500]
    assert format_box(box) == "[12, 0, 999, 500]"
    assert parse_boxes(f"The answer is {format_box(box)}.") == [box]


def test_iou_and_box_problem():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert box_problem([0, 0, 10, 10], 10, 10) is None
    assert "outside" in box_problem([0, 0, 11, 10], 10, 10)
    assert "x2<=x1" in box_problem([5, 0, 5, 10])
    assert "NaN" in box_problem([0, math.nan, 1, 1])
    assert "4 numbers" in box_problem([0, 0, 1])
    assert "numbers" in box_problem([0, 0, "1", 2])
