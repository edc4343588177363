"""The Region Generation Network: one logit per proposal from RoIAlign-pooled DINO features.

Coordinates (the reference gets these wrong): proposals are boxes in *working-image pixels*; they
are mapped to *patch-grid units* with separate x and y factors (``gw / W``, ``gh / H``) and pooled
with ``spatial_scale=1`` and ``aligned=True``, so grid cell ``(r, c)`` covers ``[c, c+1) x [r, r+1)``
and a box pools exactly the patches under it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lregions_core.loading import heavy_import


def standardise(patches: np.ndarray) -> torch.Tensor:
    """Per-channel zero mean, unit variance over the grid, so the tiny network sees the same
    value range whatever the backbone (DINO ViT-S, ViT-B, the oracle's saliency features)."""
    feats = torch.from_numpy(np.array(patches, dtype=np.float32))  # a copy: may be read-only
    mean = feats.mean(dim=(1, 2), keepdim=True)
    std = feats.std(dim=(1, 2), keepdim=True, unbiased=False).clamp_min(1e-6)
    return (feats - mean) / std


def pool_proposals(
    patches: np.ndarray,
    boxes: np.ndarray,
    size: tuple[int, int],
    roi_size: int,
    context: float = 0.0,
) -> torch.Tensor:
    """RoIAlign of standardised ``patches`` (C, gh, gw) under ``boxes`` (N, K, 4) given in pixels
    of the working image of ``size = (W, H)``. Returns (N, K, C, roi_size, roi_size).

    ``context > 0`` also pools each box enlarged ``1 + context`` times about its centre (not
    clipped: RoIAlign reads zeros, the standardised mean, outside the grid) and returns 2C
    channels: what lies just outside a box tells a box that cuts an object off from one that
    fits it, which the inside alone cannot (a thin box inside a bar looks like the whole bar).
    """
    roi_align = heavy_import("torchvision.ops").roi_align

    feats = standardise(patches)
    _, gh, gw = feats.shape
    width, height = size
    n, k, _ = boxes.shape
    scale = torch.tensor([gw / width, gh / height, gw / width, gh / height], dtype=torch.float32)
    grid_boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
    if context > 0:
        centre = (grid_boxes[:, :2] + grid_boxes[:, 2:]) / 2
        half = (grid_boxes[:, 2:] - grid_boxes[:, :2]) / 2 * (1 + context)
        grid_boxes = torch.cat([grid_boxes, torch.cat([centre - half, centre + half], dim=1)])
    pooled = roi_align(
        feats[None],
        [grid_boxes],
        output_size=roi_size,
        spatial_scale=1.0,
        sampling_ratio=2,
        aligned=True,
    )
    if context > 0:
        pooled = torch.cat([pooled[: n * k], pooled[n * k :]], dim=1)
    return pooled.reshape(n, k, pooled.shape[1], roi_size, roi_size)


def box_geometry(boxes: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Relative width and height of each box, (N, K, 2): tells proposals of one anchor apart
    even where pooled features look alike."""
    width, height = size
    b = torch.as_tensor(boxes, dtype=torch.float32)
    return torch.stack([(b[..., 2] - b[..., 0]) / width, (b[..., 3] - b[..., 1]) / height], dim=-1)


class RegionNet(nn.Module):
    """Two 1x1 convolutions and two linear layers (the paper's shape), shared by all anchors.

    The 1x1 convolutions are written as linear layers over each pooled position (the same
    function and initialisation; on a CPU their backward pass is about twice as fast for these
    small inputs). The last layer starts at zero, so the initial policy is uniform over each
    anchor's proposals: learning, not initial noise, decides which box is picked.
    """

    def __init__(self, in_channels: int, roi_size: int = 7, hidden: int = 16) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 4),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Linear(4 * roi_size * roi_size + 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, pooled: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """``pooled`` (N, K, C, l, l), ``geometry`` (N, K, 2) -> logits (N, K)."""
        n, k = pooled.shape[:2]
        x = self.convs(pooled.flatten(0, 1).permute(0, 2, 3, 1))  # (N*K, l, l, 4)
        x = x.permute(0, 3, 1, 2).flatten(1)  # channel-major, as a convolution's output
        x = torch.cat([x, geometry.reshape(n * k, 2)], dim=1)
        return self.head(x).reshape(n, k)
