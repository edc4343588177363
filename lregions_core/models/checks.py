"""Numerical checks for running the models in half precision and in batches, with the tolerances
they must meet. The CPU tests run them on tiny random-weight models; ``benchmarks/bench_gpu.py``
runs them on the GPU it times and prints the measured gaps next to these tolerances.

Why these tolerances: CLIP's losses of two boxes of one photo often differ only in the second
decimal, so a precision whose error reaches that would change which box the learner prefers.
float16 (10-bit mantissa) stays an order of magnitude below it; bfloat16 (7 bits) does not
always, which is why ``dtype="auto"`` means float16 on CUDA, and bfloat16 is an option. The
gaps measured so far are in the benchmarks documentation (Real size and GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from lregions_core.interfaces import Editor, EditRequest, FeatureExtractor, Scorer

SCORE_FIELDS = ("loss_clip", "loss_dir", "loss_str", "text_sim", "image_sim")
# Largest absolute difference from float32 allowed for any CLIP loss or similarity.
CLIP_TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}
# Largest absolute difference from float32 of DINO's attention and patch features, as a
# fraction of the largest absolute value of each (their scales differ by orders of magnitude).
DINO_TOLERANCE = {"float32": 1e-5, "float16": 0.01, "bfloat16": 0.05}
# Largest difference in 0..255 pixel levels between an edit made alone and the same request
# edited in a batch with others (batched kernels may round differently; seeds are per request).
BATCH_TOLERANCE_LEVELS = 2


def score_gaps(
    reference: Scorer,
    other: Scorer,
    source: Image.Image,
    candidates: Sequence[Image.Image],
    prompt: str,
    source_prompt: str | None,
) -> dict[str, float]:
    """Largest |difference| per score field between two scorers on the same candidates."""
    seeds = list(range(len(candidates)))
    scores = [
        scorer.score(scorer.prepare(source, prompt, source_prompt), candidates, seeds)
        for scorer in (reference, other)
    ]
    return {
        name: max(abs(getattr(a, name) - getattr(b, name)) for a, b in zip(*scores, strict=True))
        for name in SCORE_FIELDS
    }


def feature_gaps(
    reference: FeatureExtractor, other: FeatureExtractor, image: Image.Image
) -> dict[str, float]:
    """Largest |difference| of attention and patch features, relative to each one's scale."""
    a, b = reference(image), other(image)
    return {
        name: float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12))
        for name, x, y in (
            ("attention", a.attention, b.attention),
            ("patches", a.patches, b.patches),
        )
    }


def batch_gap(editor: Editor, target: EditRequest, others: Sequence[EditRequest]) -> float:
    """Largest pixel-level difference of ``target`` edited alone vs in one call with ``others``
    (``target`` goes in the middle of the batch)."""
    alone = np.asarray(editor.edit([target])[0], dtype=np.int16)
    half = len(others) // 2
    batch = [*others[:half], target, *others[half:]]
    together = np.asarray(editor.edit(batch)[half], dtype=np.int16)
    return float(np.abs(alone - together).max())
