"""Anchor points: the patches DINO's CLS token attends to most, and the boxes drawn around them.

Coordinates: an anchor is a patch-grid cell ``(row, col)``; :func:`cell_centres` turns cells into
``(x, y)`` pixel centres of the working image (x along the width). Proposals are boxes
``(x0, y0, x1, y1)`` in pixel-edge coordinates of the working image (0..W, 0..H).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def find_anchors(
    attention: np.ndarray,
    num: int,
    *,
    rule: str = "nms",
    spread: float = 0.1,
    max_half_width: float = 0.4375,
) -> np.ndarray:
    """``num`` anchor cells ``(row, col)`` (int array of shape (num, 2)) from an attention grid.

    ``rule="nms"``: greedy non-maximum suppression: take the most attended cell, suppress every
    cell within ``radius = int(np.floor(spread * min(gh, gw) + 0.5))  # half up, not to even`` cells (Chebyshev distance), repeat. When
    suppression leaves too few cells the rest are the most attended unused cells, so anchors are
    always distinct while the grid has enough cells.

    ``rule="reference"``: the public implementation's rule: most attended cells whose largest box
    (half-width ``max_half_width`` of the grid's shorter side) fits inside the grid, topped up with
    the raw most attended cells; anchors can repeat.
    """
    if attention.ndim != 2:
        raise ValueError(f"attention must be a 2-D grid, got shape {attention.shape}")
    gh, gw = attention.shape
    flat = attention.reshape(-1).astype(np.float64)
    # Stable order: ties broken by raster position so results never depend on sort internals.
    order = np.lexsort((np.arange(flat.size), -flat))
    cells = np.stack(np.unravel_index(order, (gh, gw)), axis=1)

    if rule == "nms":
        radius = int(np.floor(spread * min(gh, gw) + 0.5))  # half up, not to even
        chosen: list[np.ndarray] = []
        suppressed = np.zeros((gh, gw), dtype=bool)
        for cell in cells:
            if len(chosen) == num:
                break
            r, c = cell
            if suppressed[r, c]:
                continue
            chosen.append(cell)
            suppressed[max(0, r - radius) : r + radius + 1, max(0, c - radius) : c + radius + 1] = True
        if len(chosen) < num:
            taken = {tuple(c) for c in chosen}
            chosen += [c for c in cells if tuple(c) not in taken][: num - len(chosen)]
        while len(chosen) < num:  # fewer cells than anchors: repeat the best ones
            chosen.append(cells[len(chosen) % len(cells)])
        return np.asarray(chosen, dtype=np.int64)

    if rule == "peaks":
        return _hill_peaks(attention, num, cells, spread)

    if rule == "reference":
        half = max_half_width * min(gh, gw)
        fits = [
            c
            for c in cells
            if c[0] + 0.5 - half >= 0
            and c[0] + 0.5 + half <= gh
            and c[1] + 0.5 - half >= 0
            and c[1] + 0.5 + half <= gw
        ]
        chosen = fits[:num]
        chosen += list(cells[: num - len(chosen)])  # top-up may repeat a cell already chosen
        while len(chosen) < num:
            chosen.append(cells[len(chosen) % len(cells)])
        return np.asarray(chosen, dtype=np.int64)

    raise ValueError(f"unknown anchor rule {rule!r}; use 'nms', 'peaks' or 'reference'")


def _hill_peaks(attention: np.ndarray, num: int, cells: np.ndarray, spread: float) -> np.ndarray:
    """One anchor per attention hill, highest hill first, then NMS among what is left.

    A fixed NMS radius lets one large salient object take several anchors while a small one
    (often the target, among larger distractors) gets none. Here each pick suppresses its whole
    *hill*: every cell reachable from it by 8-connected steps that never go up (a plateau counts
    as downhill). The next pick is then the top of another hill, behind a saddle. When every hill
    has an anchor, the remaining anchors follow the ``nms`` rule over the cells not yet chosen.
    """
    gh, gw = attention.shape
    values = attention.astype(np.float64)
    tolerance = 1e-9 * max(float(np.abs(values).max()), 1e-30)  # float noise on a plateau
    suppressed = np.zeros((gh, gw), dtype=bool)
    chosen: list[np.ndarray] = []
    for cell in cells:  # cells in attention order: the first unsuppressed one tops a new hill
        if len(chosen) == num:
            break
        if suppressed[cell[0], cell[1]]:
            continue
        chosen.append(cell)
        stack = [(int(cell[0]), int(cell[1]))]
        suppressed[cell[0], cell[1]] = True
        while stack:
            r, c = stack.pop()
            for nr in range(max(0, r - 1), min(gh, r + 2)):
                for nc in range(max(0, c - 1), min(gw, c + 2)):
                    if not suppressed[nr, nc] and values[nr, nc] <= values[r, c] + tolerance:
                        suppressed[nr, nc] = True
                        stack.append((nr, nc))
    if len(chosen) < num:
        taken = {tuple(c) for c in chosen}
        rest = find_anchors(attention, num, rule="nms", spread=spread)
        chosen += [c for c in rest if tuple(c) not in taken][: num - len(chosen)]
    return np.asarray(chosen[:num], dtype=np.int64)


def refine_cells(attention: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Sub-cell anchor positions (float ``(row, col)``, shape (N, 2)): the vertex of a parabola
    through each cell's attention and its two neighbours, per axis, clipped to half a cell.

    A box is centred on its anchor, so a cell-centre anchor is up to half a patch off the
    attended object's centre: little for a large object, most of the object for a thin bar.
    """
    gh, gw = attention.shape
    values = attention.astype(np.float64)
    out = cells.astype(np.float64).copy()
    for i, (r, c) in enumerate(cells):
        for axis, (lo, hi) in enumerate(
            [((r - 1, c), (r + 1, c)), ((r, c - 1), (r, c + 1))]
        ):
            limit = gh if axis == 0 else gw
            if min(lo[axis], hi[axis]) < 0 or max(lo[axis], hi[axis]) >= limit:
                continue  # at the grid's edge: no neighbour on one side
            a, b, d = values[lo], values[r, c], values[hi]
            curvature = a - 2 * b + d
            if curvature < 0:  # a maximum along this axis
                out[i, axis] += float(np.clip(0.5 * (a - d) / curvature, -0.5, 0.5))
    return out


def random_anchors(grid: tuple[int, int], num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` distinct cells drawn uniformly (the paper's random-anchor ablation)."""
    gh, gw = grid
    picks = rng.choice(gh * gw, size=num, replace=num > gh * gw)
    return np.stack(np.unravel_index(picks, (gh, gw)), axis=1).astype(np.int64)


def cell_centres(cells: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Pixel centres ``(x, y)`` (float, shape (N, 2)) of grid cells ``(row, col)`` in an image of
    ``size = (W, H)`` whose patch grid is ``grid = (gh, gw)``."""
    gh, gw = grid
    width, height = size
    rows = cells[:, 0].astype(np.float64)
    cols = cells[:, 1].astype(np.float64)
    return np.stack([(cols + 0.5) * width / gw, (rows + 0.5) * height / gh], axis=1)


def make_proposals(
    centres: np.ndarray,
    size: tuple[int, int],
    num: int,
    min_half_width: float,
    max_half_width: float,
    *,
    aspects: Sequence[float] = (1.0,),
    spacing: str = "linear",
) -> np.ndarray:
    """``num`` sizes x ``len(aspects)`` boxes around each centre, clipped to the image.

    Half-sizes ``s`` run from ``min_half_width`` to ``max_half_width`` times the image's shorter
    side, ``linspace`` (the reference's 4, 6, ..., 14 cells of a 32-cell grid are 0.125 ...
    0.4375) or ``geomspace`` (``spacing="geometric"``: the same *ratio* between neighbours, so
    small boxes are as finely graded as large ones). Each size gets one box per width:height
    ratio ``a``, of half-width ``s * sqrt(a)`` and half-height ``s / sqrt(a)`` (the square's area).
    Boxes are ordered size-major: proposal ``i * len(aspects) + j`` is size ``i``, ratio ``j``.
    Returns float boxes ``(x0, y0, x1, y1)`` of shape (N, num * len(aspects), 4).
    """
    width, height = size
    if spacing == "linear":
        halves = np.linspace(min_half_width, max_half_width, num)
    elif spacing == "geometric":
        halves = np.geomspace(min_half_width, max_half_width, num)
    else:
        raise ValueError(f"unknown proposal spacing {spacing!r}; use 'linear' or 'geometric'")
    root = np.sqrt(np.asarray(aspects, dtype=np.float64))
    half_w = (halves[:, None] * root[None, :]).reshape(-1) * min(width, height)
    half_h = (halves[:, None] / root[None, :]).reshape(-1) * min(width, height)
    cx = centres[:, 0:1]
    cy = centres[:, 1:2]
    boxes = np.stack(
        [
            np.clip(cx - half_w, 0, width),
            np.clip(cy - half_h, 0, height),
            np.clip(cx + half_w, 0, width),
            np.clip(cy + half_h, 0, height),
        ],
        axis=-1,
    )
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``(..., 4)`` broadcast against each other."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
