"""Tests for lregions_core.region_net: standardisation, RoIAlign coordinates, box geometry and the
region network (uniform start, shapes, gradients reaching every parameter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lregions_core.region_net import RegionNet, box_geometry, pool_proposals, standardise

GH, GW = 4, 8  # patch grid: 4 rows, 8 columns
W, H = 160, 40  # working image: one cell is 20 px wide and 10 px tall (different x / y scales)


def _index_patches() -> np.ndarray:
    """(2, GH, GW): channel 0 is the column index, channel 1 the row index."""
    rows, cols = np.mgrid[0:GH, 0:GW].astype(np.float32)
    return np.stack([cols, rows])


def _unstandardise(pooled: torch.Tensor) -> np.ndarray:
    """Undo :func:`standardise` for :func:`_index_patches` (population std)."""
    rows, cols = np.mgrid[0:GH, 0:GW].astype(np.float64)
    mean = np.array([cols.mean(), rows.mean()])  # 3.5, 1.5
    std = np.array([cols.std(), rows.std()])  # sqrt(5.25), sqrt(1.25)
    p = pooled.detach().numpy().astype(np.float64)
    return p * std[:, None, None] + mean[:, None, None]


def _expected_bins(lo: float, hi: float, n: int) -> np.ndarray:
    """Values of an index channel pooled over grid units [lo, hi) in n bins.

    Cell i covers [i, i+1) and holds value i, so the value at grid coordinate u is u - 0.5
    (bilinear interpolation of a linear ramp is exact away from the border); a bin's mean is the
    value at its centre."""
    return lo + (np.arange(n) + 0.5) * (hi - lo) / n - 0.5


# ------------------------------------------------------------------------------------------------
def test_standardise_zero_mean_unit_std_per_channel():
    rng = np.random.default_rng(0)
    patches = rng.normal([[[5.0]], [[-3.0]], [[100.0]]], [[[2.0]], [[0.1]], [[30.0]]], (3, 5, 7))
    out = standardise(patches)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert out.shape == (3, 5, 7)
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(dim=(1, 2), unbiased=False).numpy(), 1.0, atol=1e-5)


def test_standardise_exact_values_and_constant_channel():
    # channel 0: values 0, 2 -> mean 1, population std 1 -> -1, 1
    # channel 1: constant -> zeros, not NaN
    patches = np.array([[[0.0, 2.0]], [[7.0, 7.0]]])
    out = standardise(patches).numpy()
    np.testing.assert_allclose(out, [[[-1.0, 1.0]], [[0.0, 0.0]]])


# ------------------------------------------------------------------------------------------------
def test_roi_align_pools_exactly_the_cells_under_the_box():
    # Grid columns 2..4 and rows 1..2 are, in working pixels, x 40..100 and y 10..30.
    boxes = np.array([[[40.0, 10.0, 100.0, 30.0]]])
    pooled = pool_proposals(_index_patches(), boxes, (W, H), roi_size=3)
    assert pooled.shape == (1, 1, 2, 3, 3)
    raw = _unstandardise(pooled[0, 0])
    # mean column index over cells 2, 3, 4 is 3; mean row index over rows 1, 2 is 1.5
    assert raw[0].mean() == pytest.approx(3.0, abs=1e-4)
    assert raw[1].mean() == pytest.approx(1.5, abs=1e-4)
    # bin by bin: columns 2, 3, 4 exactly (x varies along the last axis) ...
    np.testing.assert_allclose(raw[0], np.tile([2.0, 3.0, 4.0], (3, 1)), atol=1e-4)
    # ... and rows 1 + (i + 0.5) * 2/3 - 0.5 = 0.8333, 1.5, 2.1667 (y varies along axis -2)
    np.testing.assert_allclose(raw[1], np.tile([[5 / 6], [1.5], [13 / 6]], (1, 3)), atol=1e-4)


def test_roi_align_each_proposal_pools_its_own_box():
    # N=2 anchors x K=3 proposals, all inside the sampling-safe interior of the grid; a mixed-up
    # reshape (anchors vs proposals) or swapped x / y scales would put the wrong values here.
    boxes = np.array(
        [
            [[40, 10, 100, 30], [20, 10, 60, 20], [100, 5, 140, 35]],
            [[10, 5, 150, 35], [60, 20, 80, 30], [30, 15, 130, 25]],
        ],
        dtype=np.float64,
    )
    roi = 4
    pooled = pool_proposals(_index_patches(), boxes, (W, H), roi_size=roi)
    assert pooled.shape == (2, 3, 2, roi, roi)
    for a in range(2):
        for k in range(3):
            x0, y0, x1, y1 = boxes[a, k]
            cols = _expected_bins(x0 * GW / W, x1 * GW / W, roi)
            rows = _expected_bins(y0 * GH / H, y1 * GH / H, roi)
            raw = _unstandardise(pooled[a, k])
            np.testing.assert_allclose(raw[0], np.tile(cols, (roi, 1)), atol=1e-4)
            np.testing.assert_allclose(raw[1], np.tile(rows[:, None], (1, roi)), atol=1e-4)


def test_roi_align_left_half_smaller_columns_than_right_half():
    boxes = np.array([[[0, 0, W / 2, H], [W / 2, 0, W, H]]], dtype=np.float64)
    pooled = pool_proposals(_index_patches(), boxes, (W, H), roi_size=7)
    left_cols = pooled[0, 0, 0].mean().item()
    right_cols = pooled[0, 1, 0].mean().item()
    assert left_cols < right_cols
    # undone: left half covers columns 0..3 (mean 1.5), right half 4..7 (mean 5.5). RoIAlign
    # clamps samples that fall in the outer half cell to the border value, which pulls the
    # means inwards slightly (by 0.03 here), hence the tolerance; a wrong scale would be far off.
    raw = _unstandardise(pooled[0])
    assert raw[0, 0].mean() == pytest.approx(1.5, abs=0.05)
    assert raw[1, 0].mean() == pytest.approx(5.5, abs=0.05)
    # the two halves mirror each other about the grid's centre column 3.5
    assert raw[0, 0].mean() + raw[1, 0].mean() == pytest.approx(7.0, abs=1e-4)
    # both span all rows: mean row index 1.5 (symmetric clamping cancels)
    assert raw[0, 1].mean() == pytest.approx(1.5, abs=1e-4)
    assert raw[1, 1].mean() == pytest.approx(1.5, abs=1e-4)


def test_roi_align_top_half_smaller_rows_than_bottom_half():
    boxes = np.array([[[0, 0, W, H / 2]], [[0, H / 2, W, H]]], dtype=np.float64)
    raw = _unstandardise(pool_proposals(_index_patches(), boxes, (W, H), roi_size=5)[:, 0])
    # rows 0, 1 and rows 2, 3 (border clamping pulls each mean inwards by 0.06)
    assert raw[0, 1].mean() == pytest.approx(0.5, abs=0.1)
    assert raw[1, 1].mean() == pytest.approx(2.5, abs=0.1)
    assert raw[0, 1].mean() + raw[1, 1].mean() == pytest.approx(3.0, abs=1e-4)
    assert raw[0, 1].max() < raw[1, 1].min()
    assert raw[0, 0].mean() == pytest.approx(3.5, abs=1e-4)


def test_roi_align_single_cell():
    # the cell (row 2, col 5) is x 100..120, y 20..30: every bin holds exactly its value
    raw = _unstandardise(
        pool_proposals(_index_patches(), np.array([[[100, 20, 120, 30]]], float), (W, H), 1)[0, 0]
    )
    assert raw[0, 0, 0] == pytest.approx(5.0, abs=1e-4)
    assert raw[1, 0, 0] == pytest.approx(2.0, abs=1e-4)


# ------------------------------------------------------------------------------------------------
def test_box_geometry_relative_sizes():
    boxes = np.array([[[0, 0, 160, 40], [40, 10, 100, 30]]], dtype=np.float64)
    got = box_geometry(boxes, (W, H))
    assert got.shape == (1, 2, 2)
    np.testing.assert_allclose(got.numpy(), [[[1.0, 1.0], [60 / 160, 20 / 40]]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
def _inputs(n: int = 3, k: int = 5, c: int = 6, roi: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(n, k, c, roi, roi, generator=g)
    geometry = torch.rand(n, k, 2, generator=g)
    return pooled, geometry


def test_region_net_initial_logits_exactly_zero_and_uniform_policy():
    torch.manual_seed(0)
    net = RegionNet(6, roi_size=7, hidden=16)
    pooled, geometry = _inputs()
    logits = net(pooled, geometry)
    assert logits.shape == (3, 5)
    assert torch.equal(logits, torch.zeros(3, 5))
    probs = torch.softmax(logits, dim=1)
    assert torch.equal(probs, torch.full((3, 5), 0.2))


def test_region_net_other_roi_size_and_shape():
    net = RegionNet(2, roi_size=4, hidden=8)
    pooled, geometry = _inputs(n=2, k=6, c=2, roi=4)
    assert net(pooled, geometry).shape == (2, 6)
    with pytest.raises(RuntimeError):  # wrong roi size for the head
        net(*_inputs(n=2, k=6, c=2, roi=5))


def test_region_net_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = RegionNet(6, roi_size=7, hidden=16)
    pooled, geometry = _inputs()
    target = torch.tensor([[3.0, 1.0, 2.0, 0.0, 5.0]] * 3)  # loss per box; box 3 is best
    start = {name: p.detach().clone() for name, p in net.named_parameters()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def step() -> float:
        probs = torch.softmax(net(pooled, geometry), dim=1)
        loss = (probs * target).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    first = step()
    assert first == pytest.approx(target[0].mean().item())  # uniform policy
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, start[n])}
    # the last layer starts at zero, so nothing before it gets a gradient on the first step
    assert moved == {"head.2.weight", "head.2.bias"}

    step()
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, start[n])}
    assert moved == {n for n, _ in net.named_parameters()}

    for _ in range(40):
        step()
    probs = torch.softmax(net(pooled, geometry), dim=1)
    # learning moved probability towards the cheapest box for every anchor
    assert (probs.argmax(dim=1) == 3).all()
    assert (probs[:, 3] > 0.2).all()
