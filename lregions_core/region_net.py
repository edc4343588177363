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
    patches: np.ndarray, boxes: np.ndarray, size: tuple[int, int], roi_size: int
) -> torch.Tensor:
    """RoIAlign of standardised ``patches`` (C, gh, gw) under ``boxes`` (N, K, 4) given in pixels
    of the working image of ``size = (W, H)``. Returns (N, K, C, roi_size, roi_size)."""
    roi_align = heavy_import("torchvision.ops").roi_align

    feats = standardise(patches)
    _, gh, gw = feats.shape
    width, height = size
    n, k, _ = boxes.shape
    scale = torch.tensor([gw / width, gh / height, gw / width, gh / height], dtype=torch.float32)
    grid_boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
    pooled = roi_align(
        feats[None],
        [grid_boxes],
        output_size=roi_size,
        spatial_scale=1.0,
        sampling_ratio=2,
        aligned=True,
    )
    return pooled.reshape(n, k, feats.shape[0], roi_size, roi_size)


def box_geometry(boxes: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Relative width and height of each box, (N, K, 2): tells proposals of one anchor apart
    even where pooled features look alike."""
    width, height = size
    b = torch.as_tensor(boxes, dtype=torch.float32)
    return torch.stack([(b[..., 2] - b[..., 0]) / width, (b[..., 3] - b[..., 1]) / height], dim=-1)


class RegionNet(nn.Module):
    """Two 1x1 convolutions and two linear layers (the paper's shape), shared by all anchors.

    The last layer starts at zero, so the initial policy is uniform over each anchor's
    proposals: learning, not initial noise, decides which box is picked.
    """

    def __init__(self, in_channels: int, roi_size: int = 7, hidden: int = 16) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 4, kernel_size=1),
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
        x = self.convs(pooled.flatten(0, 1)).flatten(1)
        x = torch.cat([x, geometry.reshape(n * k, 2)], dim=1)
        return self.head(x).reshape(n, k)
