"""Tests for lregions_core.anchors: anchor rules, random anchors, cell centres, proposals, IoU.

Every expected value below is worked out by hand in the comments next to it.
"""

from __future__ import annotations

import numpy as np
import pytest

from lregions_core.anchors import (
    box_iou,
    cell_centres,
    find_anchors,
    make_proposals,
    random_anchors,
)


def _cells(arr: np.ndarray) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in c) for c in arr]


def _two_peaks() -> np.ndarray:
    """6x6 grid, zero everywhere except a peak at (1, 1) = 10, its neighbour (1, 2) = 9.5 and a
    second, weaker peak at (4, 4) = 9."""
    att = np.zeros((6, 6), dtype=np.float32)
    att[1, 1] = 10.0
    att[1, 2] = 9.5
    att[4, 4] = 9.0
    return att


# ------------------------------------------------------------------------------------------------
# find_anchors, rule="nms"
# ------------------------------------------------------------------------------------------------
def test_nms_two_peaks_exact():
    # radius = round(0.1 * 6) = 1. (1,1) is taken first and suppresses rows 0-2 x cols 0-2, so its
    # neighbour (1,2) = 9.5 is skipped; (4,4) is next and suppresses rows 3-5 x cols 3-5. All other
    # cells tie at 0, broken by raster order: the first unsuppressed one is (0,3).
    got = find_anchors(_two_peaks(), 3, rule="nms", spread=0.1)
    assert got.dtype == np.int64
    assert got.shape == (3, 2)
    assert _cells(got) == [(1, 1), (4, 4), (0, 3)]


def test_nms_zero_radius_is_plain_top_k():
    # spread 0.05 on a 6x6 grid: radius = round(0.3) = 0, nothing but the cell itself is suppressed.
    got = find_anchors(_two_peaks(), 4, rule="nms", spread=0.05)
    assert _cells(got) == [(1, 1), (1, 2), (4, 4), (0, 0)]


def test_nms_large_radius_tops_up_with_most_attended_unused_cells():
    # spread 1.0: radius = 6 covers the whole grid after the first pick; the rest are the most
    # attended cells not yet chosen, in attention order then raster order.
    got = find_anchors(_two_peaks(), 6, rule="nms", spread=1.0)
    assert _cells(got) == [(1, 1), (1, 2), (4, 4), (0, 0), (0, 1), (0, 2)]
    assert len(set(_cells(got))) == 6


def test_nms_radius_three_partial_suppression():
    # radius = round(0.5 * 6) = 3. (1,1) suppresses rows 0-4 x cols 0-4 (so also (4,4), at
    # Chebyshev distance 3). Among zeros in raster order the first free cell is (0,5); it
    # suppresses rows 0-3 x cols 2-5. Next free cell in raster order: (4,5), which suppresses
    # rows 1-5 x cols 2-5; then (5,0).
    got = find_anchors(_two_peaks(), 4, rule="nms", spread=0.5)
    assert _cells(got) == [(1, 1), (0, 5), (4, 5), (5, 0)]


@pytest.mark.parametrize("seed", range(6))
def test_nms_picks_global_max_first_and_spreads(seed):
    rng = np.random.default_rng(seed)
    att = rng.random((10, 12)).astype(np.float32)
    spread = 0.2  # radius = round(2.0) = 2: each anchor blocks at most 25 of 120 cells
    radius = 2
    got = find_anchors(att, 4, rule="nms", spread=spread)
    assert tuple(got[0]) == np.unravel_index(np.argmax(att), att.shape)
    cells = _cells(got)
    assert len(set(cells)) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            cheb = max(abs(cells[i][0] - cells[j][0]), abs(cells[i][1] - cells[j][1]))
            assert cheb > radius
    # greedy: each anchor is the best cell not within the radius of an earlier one
    for i, (r, c) in enumerate(cells):
        free = np.ones_like(att, dtype=bool)
        for pr, pc in cells[:i]:
            free[max(0, pr - radius) : pr + radius + 1, max(0, pc - radius) : pc + radius + 1] = 0
        masked = np.where(free, att, -np.inf)
        assert (r, c) == np.unravel_index(np.argmax(masked), att.shape)


def test_nms_anchors_distinct_while_enough_cells():
    # 3x3 grid, spread 1 (radius 3): only one cell survives suppression, yet 9 anchors must be
    # the 9 distinct cells.
    att = np.arange(9, dtype=np.float32).reshape(3, 3)
    got = find_anchors(att, 9, rule="nms", spread=1.0)
    assert sorted(_cells(got)) == [(r, c) for r in range(3) for c in range(3)]
    # attention order: 8 (2,2) first, then 7 (2,1), ...
    assert _cells(got)[:3] == [(2, 2), (2, 1), (2, 0)]


def test_nms_more_anchors_than_cells_repeats_best():
    # 2x2 grid with values 4,3,2,1 in raster order: four distinct cells, then the best repeat.
    att = np.array([[4.0, 3.0], [2.0, 1.0]])
    got = find_anchors(att, 6, rule="nms", spread=0.0)
    assert _cells(got) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1)]


def test_nms_ties_broken_by_raster_order_and_deterministic():
    att = np.ones((4, 5), dtype=np.float32)
    got = find_anchors(att, 3, rule="nms", spread=0.0)
    assert _cells(got) == [(0, 0), (0, 1), (0, 2)]
    # radius = round(0.25 * 4) = 1: (0,0), then first raster cell at distance >= 2: (0,2),
    # then (0,4)
    got = find_anchors(att, 3, rule="nms", spread=0.25)
    assert _cells(got) == [(0, 0), (0, 2), (0, 4)]
    again = find_anchors(att.copy(), 3, rule="nms", spread=0.25)
    assert np.array_equal(got, again)


def test_nms_non_square_grid_returns_row_col():
    # 3 rows x 7 cols; the peak is at row 2, col 6 (a cell that only exists as (row, col)).
    att = np.zeros((3, 7))
    att[2, 6] = 1.0
    got = find_anchors(att, 1)
    assert _cells(got) == [(2, 6)]


# ------------------------------------------------------------------------------------------------
# find_anchors, rule="reference"
# ------------------------------------------------------------------------------------------------
def test_reference_prefers_cells_whose_largest_box_fits():
    # 8x8 grid, max_half_width 0.25 -> half = 2 cells. A cell fits when r + 0.5 - 2 >= 0 and
    # r + 0.5 + 2 <= 8, i.e. 2 <= r <= 5 (same for columns).
    att = np.zeros((8, 8))
    att[0, 0] = 10.0  # most attended, but its box does not fit
    att[3, 3] = 5.0
    got = find_anchors(att, 3, rule="reference", max_half_width=0.25)
    # (3,3), then the zero-valued fitting cells in raster order: (2,2), (2,3)
    assert _cells(got) == [(3, 3), (2, 2), (2, 3)]


def test_reference_tops_up_with_raw_top_cells_and_repeats():
    # 4x4 grid, max_half_width 0.375 -> half = 1.5 cells: fitting rows/cols are 1..2 (4 cells).
    att = np.zeros((4, 4))
    att[1, 1] = 10.0
    att[0, 0] = 8.0
    att[2, 2] = 6.0
    got = find_anchors(att, 6, rule="reference", max_half_width=0.375)
    # fits by attention: (1,1), (2,2), then zeros in raster order (1,2), (2,1); top-up with the
    # raw best two cells (1,1) (a repeat) and (0,0).
    assert _cells(got) == [(1, 1), (2, 2), (1, 2), (2, 1), (1, 1), (0, 0)]
    assert len(set(_cells(got))) == 5


def test_reference_more_anchors_than_cells():
    # 2x2 grid, default half 0.4375 * 2 = 0.875: no cell fits; all four, then repeats.
    att = np.array([[1.0, 4.0], [3.0, 2.0]])
    got = find_anchors(att, 6, rule="reference")
    assert _cells(got) == [(0, 1), (1, 0), (1, 1), (0, 0), (0, 1), (1, 0)]


def test_unknown_rule_and_bad_shape():
    with pytest.raises(ValueError, match="unknown anchor rule"):
        find_anchors(np.zeros((3, 3)), 1, rule="bogus")
    with pytest.raises(ValueError, match="2-D"):
        find_anchors(np.zeros((1, 3, 3)), 1)


# ------------------------------------------------------------------------------------------------
# random_anchors
# ------------------------------------------------------------------------------------------------
def test_random_anchors_distinct_in_range_and_seeded():
    a = random_anchors((5, 7), 10, np.random.default_rng(0))
    assert a.shape == (10, 2) and a.dtype == np.int64
    assert len(set(_cells(a))) == 10
    assert (a[:, 0] >= 0).all() and (a[:, 0] < 5).all()
    assert (a[:, 1] >= 0).all() and (a[:, 1] < 7).all()
    same = random_anchors((5, 7), 10, np.random.default_rng(0))
    other = random_anchors((5, 7), 10, np.random.default_rng(1))
    assert np.array_equal(a, same)
    assert not np.array_equal(a, other)


def test_random_anchors_every_cell_and_more():
    all_cells = random_anchors((2, 3), 6, np.random.default_rng(3))
    assert sorted(_cells(all_cells)) == [(r, c) for r in range(2) for c in range(3)]
    more = random_anchors((2, 3), 8, np.random.default_rng(3))  # must repeat, must not fail
    assert more.shape == (8, 2)
    assert (more[:, 0] < 2).all() and (more[:, 1] < 3).all()


def test_random_anchors_cover_columns_on_wide_grid():
    # a 1 x 9 grid: every cell has row 0 and the column varies
    a = random_anchors((1, 9), 9, np.random.default_rng(0))
    assert set(a[:, 0].tolist()) == {0}
    assert sorted(a[:, 1].tolist()) == list(range(9))


# ------------------------------------------------------------------------------------------------
# cell_centres
# ------------------------------------------------------------------------------------------------
def test_cell_centres_non_square_grid_and_image():
    # grid (gh=2, gw=4), image W=400, H=100: a cell is 100 px wide and 50 px tall.
    cells = np.array([[1, 3], [0, 0], [0, 2], [1, 0]])
    got = cell_centres(cells, (2, 4), (400, 100))
    expected = np.array([[350.0, 75.0], [50.0, 25.0], [250.0, 25.0], [50.0, 75.0]])
    np.testing.assert_allclose(got, expected)
    assert got.shape == (4, 2)


def test_cell_centres_tall_image():
    # grid (gh=5, gw=2), image W=60, H=250: cells 30 x 50 px; (4, 1) -> x=45, y=225
    got = cell_centres(np.array([[4, 1]]), (5, 2), (60, 250))
    np.testing.assert_allclose(got, [[45.0, 225.0]])


# ------------------------------------------------------------------------------------------------
# make_proposals
# ------------------------------------------------------------------------------------------------
def test_proposals_exact_boxes():
    # W=100, H=80: shorter side 80, half-widths linspace(0.125, 0.5, 4) * 80 = 10, 20, 30, 40
    boxes = make_proposals(np.array([[50.0, 40.0]]), (100, 80), 4, 0.125, 0.5)
    assert boxes.shape == (1, 4, 4)
    np.testing.assert_allclose(
        boxes[0],
        [[40, 30, 60, 50], [30, 20, 70, 60], [20, 10, 80, 70], [10, 0, 90, 80]],
    )


def test_proposals_clipped_at_border():
    # centre (5, 75) in 100x80, halves 10..40
    boxes = make_proposals(np.array([[5.0, 75.0], [95.0, 5.0]]), (100, 80), 4, 0.125, 0.5)
    assert boxes.shape == (2, 4, 4)
    np.testing.assert_allclose(
        boxes[0],
        [[0, 65, 15, 80], [0, 55, 25, 80], [0, 45, 35, 80], [0, 35, 45, 80]],
    )
    np.testing.assert_allclose(
        boxes[1],
        [[85, 0, 100, 15], [75, 0, 100, 25], [65, 0, 100, 35], [55, 0, 100, 45]],
    )
    assert boxes[..., [0, 2]].min() >= 0 and boxes[..., [0, 2]].max() <= 100
    assert boxes[..., [1, 3]].min() >= 0 and boxes[..., [1, 3]].max() <= 80


def test_proposals_nested_and_increasing():
    rng = np.random.default_rng(0)
    size = (128, 96)
    centres = rng.uniform([0, 0], size, (7, 2))
    boxes = make_proposals(centres, size, 6, 0.125, 0.4375)
    assert boxes.shape == (7, 6, 4)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    assert (np.diff(area, axis=1) > 0).all()
    inner, outer = boxes[:, :-1], boxes[:, 1:]
    assert (outer[..., 0] <= inner[..., 0]).all() and (outer[..., 1] <= inner[..., 1]).all()
    assert (outer[..., 2] >= inner[..., 2]).all() and (outer[..., 3] >= inner[..., 3]).all()
    # each box contains its own centre
    assert (boxes[..., 0] <= centres[:, None, 0]).all()
    assert (boxes[..., 2] >= centres[:, None, 0]).all()


def test_proposals_unclipped_boxes_are_square_with_linspace_halves():
    size = (400, 200)  # shorter side 200
    boxes = make_proposals(np.array([[200.0, 100.0]]), size, 3, 0.1, 0.3)
    widths = boxes[0, :, 2] - boxes[0, :, 0]
    heights = boxes[0, :, 3] - boxes[0, :, 1]
    np.testing.assert_allclose(widths, [40, 80, 120])  # 2 * (20, 40, 60)
    np.testing.assert_allclose(heights, widths)


def test_proposals_single_size():
    # K=1: linspace(min, max, 1) is [min]: one box of half-width 0.125 * 80 = 10
    boxes = make_proposals(np.array([[50.0, 40.0], [0.0, 0.0]]), (100, 80), 1, 0.125, 0.5)
    assert boxes.shape == (2, 1, 4)
    np.testing.assert_allclose(boxes[:, 0], [[40, 30, 60, 50], [0, 0, 10, 10]])


def test_proposals_no_anchors():
    assert make_proposals(np.zeros((0, 2)), (64, 64), 3, 0.1, 0.2).shape == (0, 3, 4)


# ------------------------------------------------------------------------------------------------
# box_iou
# ------------------------------------------------------------------------------------------------
def test_box_iou_values():
    a = np.array([0.0, 0.0, 2.0, 2.0])
    assert box_iou(a, a) == pytest.approx(1.0)
    # overlap 1x1, union 4 + 4 - 1 = 7
    assert box_iou(a, [1, 1, 3, 3]) == pytest.approx(1 / 7)
    # disjoint and edge-touching boxes do not overlap
    assert box_iou(a, [5, 5, 6, 6]) == 0.0
    assert box_iou(a, [2, 0, 4, 2]) == 0.0
    # nested: 1x1 inside 2x2 -> 1/4
    assert box_iou(a, [0.5, 0.5, 1.5, 1.5]) == pytest.approx(0.25)
    # half overlap of two 4x2 boxes: inter 2*2 = 4, union 8 + 8 - 4 = 12
    assert box_iou([0, 0, 4, 2], [2, 0, 6, 2]) == pytest.approx(1 / 3)
    # symmetric
    assert box_iou([1, 1, 3, 3], a) == pytest.approx(1 / 7)


def test_box_iou_degenerate_is_zero_not_nan():
    got = box_iou([1, 1, 1, 1], [1, 1, 1, 1])
    assert got == 0.0
    assert not np.isnan(got)


def test_box_iou_broadcasts():
    a = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], dtype=float)[:, None]  # (2, 1, 4)
    b = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [10, 10, 11, 11]], dtype=float)  # (3, 4)
    got = box_iou(a, b)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, [[1, 1 / 7, 0], [1 / 7, 1, 0]])
