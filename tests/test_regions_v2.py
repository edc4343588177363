"""The region-choice targets on oracle world v2, ``oracle`` preset: the proposals can fit the
targets (``exhaustive`` mean box IoU >= 0.65), learned regions get near that bound with far fewer
edits (``rgn`` >= 0.95 of ``exhaustive`` with <= 60% of its editor calls), are clearly better than
DINO anchors with random sizes (>= 0.10 above ``dino-random``), and hold up under a judge about as
unreliable as CLIP (``rgn`` with ``oracle_noise`` = ``CLIP_LIKE_NOISE`` >= 0.90 of noise-free
``exhaustive``).

The items are seeds 2000.. of the v2 generator: neither the manifest (seeds 0..35) nor the items
the defaults were tuned on (seeds 1000..1029) are among them.
"""

from __future__ import annotations

import numpy as np
import pytest

from lregions_core import oracle
from lregions_core.anchors import box_iou
from lregions_core.config import REGION_CHOICE_KEYS, make_config
from lregions_core.pipeline import Models, edit_image

SEEDS = range(2000, 2032)


@pytest.fixture(scope="module")
def items():
    return [oracle.make_item_v2(seed) for seed in SEEDS]


def _run(items, **settings) -> dict[str, float]:
    config = make_config("oracle", settings)
    models = Models.load(config)
    ious, calls = [], []
    for seed, item in zip(SEEDS, items):
        result = edit_image(item.image, item.prompt, source_prompt=item.source_prompt,
                            config=config, models=models, seed=seed)
        ious.append(float(box_iou(np.array(result.box), np.array(item.target_box))))
        calls.append(result.editor_requests)
    return {"iou": float(np.mean(ious)), "calls": float(np.mean(calls))}


@pytest.fixture(scope="module")
def results(items):
    out = {mode: _run(items, mode=mode) for mode in ("exhaustive", "rgn", "dino-random")}
    out["rgn-noisy"] = _run(items, mode="rgn", oracle_noise=oracle.CLIP_LIKE_NOISE)
    return out


def test_items_span_sizes_aspect_ratios_and_shapes(items):
    assert len(items) >= 30
    longer = np.array([max(i.image.size) for i in items])
    ratio = np.array([max(i.image.size) / min(i.image.size) for i in items])
    assert longer.min() < 300 and longer.max() > 600
    assert (ratio < 1.5).any() and (ratio > 2.0).any()
    assert {i.source_prompt.split()[-1] for i in items} == set(oracle.SHAPES_V2)


def test_exhaustive_upper_bound_fits_the_targets(results):
    assert results["exhaustive"]["iou"] >= 0.65, results


def test_rgn_reaches_the_bound_with_fewer_edits(results):
    rgn, exhaustive = results["rgn"], results["exhaustive"]
    assert rgn["iou"] >= 0.95 * exhaustive["iou"], results
    assert rgn["calls"] <= 0.60 * exhaustive["calls"], results


def test_rgn_beats_dino_random(results):
    assert results["rgn"]["iou"] >= results["dino-random"]["iou"] + 0.10, results


def test_rgn_with_a_clip_like_judge_stays_near_the_exact_bound(results):
    assert results["rgn-noisy"]["iou"] >= 0.90 * results["exhaustive"]["iou"], results
    assert results["rgn-noisy"]["iou"] < results["rgn"]["iou"]  # the noise does bite


def _method(preset: str) -> dict:
    """A preset's region-choice method (anchors, proposals, learner, budget), to run in the oracle
    world: the only world here whose judge means something."""
    config = make_config(preset)
    return {key: getattr(config, key) for key in REGION_CHOICE_KEYS}


@pytest.mark.parametrize("preset", ["default", "fast"])
def test_preset_region_choice_beats_the_papers_at_a_like_cost(items, preset):
    # What the oracle-world ablation chose for the real-model presets, against the reference's
    # proposals and learner at the same budget (anchors, iterations), on held-out items (measured
    # 2026-11-22: default 0.705 vs 0.470 IoU for 38.3 vs 37.0 calls; fast 0.521 vs 0.420 for
    # 29.0 vs 30.9).
    chosen = _run(items[:16], **_method(preset))
    budget = {k: getattr(make_config(preset), k) for k in ("num_anchors", "iterations")}
    paper = _run(items[:16], **{**_method("reference"), **budget})
    assert chosen["iou"] >= paper["iou"] + 0.05, (chosen, paper)
    assert chosen["calls"] <= 1.3 * paper["calls"], (chosen, paper)
