"""The contracts between the method and the models it drives.

The method (anchors, proposals, region network, learning, selection) only ever talks to four
kinds of component, each registered by name in :mod:`lregions_core.registry`:

* a :class:`FeatureExtractor` (DINO, or the oracle world's saliency map),
* an :class:`Editor` (Stable Diffusion inpainting, aMUSEd, or the oracle painter),
* a :class:`Scorer` (CLIP losses and similarities, or the oracle world's exact quality),
* a :class:`Segmenter` (text-prompted segmentation: CLIPSeg, or the oracle world's colour
  picker), used only when ``region_shape`` is ``mask`` or ``auto``.

All images crossing these interfaces are PIL images in mode ``RGB`` at the *working* size
(the input resized to keep its aspect ratio, see :func:`lregions_core.images.working_size`);
masks are PIL images in mode ``L`` of the same size, 255 where the editor must repaint. The
one exception is the final render of ``final_render`` "region": the editor then gets a crop of
the input around the chosen region, at up to its :attr:`Editor.native_size`, its sides
multiples of ``work_multiple`` (see :func:`lregions_core.images.render_geometry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Features:
    """What a feature extractor gives for one working image.

    ``attention``: (gh, gw) float32, the last block's CLS-to-patch attention averaged over heads
    (or the oracle's saliency), one value per patch of a gh x gw grid covering the whole image.
    ``patches``: (C, gh, gw) float32 patch features on the same grid.
    """

    attention: np.ndarray
    patches: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        return int(self.attention.shape[0]), int(self.attention.shape[1])


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str

    def __call__(self, image: Image.Image) -> Features: ...


@dataclass(frozen=True)
class EditRequest:
    """One inpainting job: repaint ``mask`` (255) of ``image`` following ``prompt``."""

    image: Image.Image
    mask: Image.Image
    prompt: str
    seed: int


@runtime_checkable
class Editor(Protocol):
    name: str
    steps_per_call: int  # denoising / decoding steps one request costs (for accounting)
    # The editor's own resolution (longer side, px): the size it was trained at and edits best
    # at. The final render (``final_render`` "region") edits the chosen region at up to this size.
    native_size: int

    def edit(self, requests: Sequence[EditRequest]) -> list[Image.Image]:
        """Return one RGB image per request, each the size of its request's image."""
        ...


@dataclass(frozen=True)
class CandidateScores:
    """Everything the method needs to know about one edited candidate.

    Losses are minimised by the region learner; similarities feed the selection score.
    """

    loss_clip: float  # 1 - cos(E_img(aug(X_o)), E_txt(T)), mean over views
    loss_dir: float  # 1 - cos(E_img(X_o) - E_img(X), E_txt(T) - E_txt(T_src))
    loss_str: float  # MSE between token self-similarity matrices of X_o and X
    text_sim: float  # cos(E_img(X_o), E_txt(T))
    image_sim: float  # cos(E_img(X_o), E_img(X))

    def total(self, w_clip: float, w_dir: float, w_str: float) -> float:
        return w_clip * self.loss_clip + w_dir * self.loss_dir + w_str * self.loss_str


@runtime_checkable
class Scorer(Protocol):
    name: str

    def prepare(
        self, source: Image.Image, prompt: str, source_prompt: str | None
    ) -> Any:
        """Everything about the source image and texts that all candidates share, computed once
        (text embeddings, the source's embedding and self-similarity)."""
        ...

    def score(
        self, context: Any, candidates: Sequence[Image.Image], seeds: Sequence[int]
    ) -> list[CandidateScores]:
        """Score candidates; ``seeds`` (one per candidate) fix the random augmentations so a
        candidate's scores are a pure function of its pixels and seed."""
        ...


@runtime_checkable
class Segmenter(Protocol):
    name: str

    def segment(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[np.ndarray]:
        """For each (image, text) pair, a float32 (H, W) map in [0, 1] at that image's size: how
        likely each pixel belongs to what ``text`` names. ``images`` are RGB crops (the region
        being refined); a map is a function of its own image and text only (not of the batch)."""
        ...
