"""Pick the final edit among the per-anchor candidates (the reference's quality score)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lregions_core.interfaces import CandidateScores


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def selection_scores(
    scores: Sequence[CandidateScores],
    *,
    text_weight: float = 2.0,
    image_weight: float = 1.0,
    top_k: int = 3,
) -> np.ndarray:
    """``S_i = text_weight * softmax(text_sim)_i + image_weight * softmax(image_sim)_i`` over the
    ``top_k`` candidates most similar to the text (softmaxes taken over those); the others get
    ``-inf``. Ties in text similarity keep the earlier candidate (stable order)."""
    if not scores:
        raise ValueError("no candidates to select from")
    text = np.array([s.text_sim for s in scores], dtype=np.float64)
    image = np.array([s.image_sim for s in scores], dtype=np.float64)
    keep = np.argsort(-text, kind="stable")[: max(1, top_k)]
    out = np.full(len(scores), -np.inf)
    out[keep] = text_weight * _softmax(text[keep]) + image_weight * _softmax(image[keep])
    return out


def select_best(
    scores: Sequence[CandidateScores],
    *,
    text_weight: float = 2.0,
    image_weight: float = 1.0,
    top_k: int = 3,
) -> tuple[int, np.ndarray]:
    """Index of the best candidate and every candidate's selection score."""
    s = selection_scores(scores, text_weight=text_weight, image_weight=image_weight, top_k=top_k)
    return int(np.argmax(s)), s
