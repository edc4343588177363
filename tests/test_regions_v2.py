"""The region-choice targets on oracle world v2 (the wide generator), ``oracle`` preset, on 100
held-out items: the proposals can fit the targets (``exhaustive`` mean box IoU >= 0.5), the
Bayesian search gets near that bound with far fewer edits (``rgn`` >= 0.95 of ``exhaustive`` with
<= 40% of its editor calls), is clearly better than DINO anchors with random sizes (>= 0.10
above ``dino-random``), and holds up under a judge about as unreliable as CLIP (``rgn`` with
``oracle_noise`` = ``CLIP_LIKE_NOISE`` >= 0.90 of noise-free ``exhaustive``).

The items are seeds 2000..2099 of the v2 generator: the search settings were chosen on seeds
1000..1099, the region priors are fitted on seeds 7000.., and the benchmark's evaluation uses
seeds 20000.. (``benchmarks/bench_regions.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

from lregions_core import oracle
from lregions_core.anchors import box_iou
from lregions_core.config import REGION_CHOICE_KEYS, make_config
from lregions_core.pipeline import Models, edit_image

SEEDS = range(2000, 2100)


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
    assert len(items) >= 100
    longer = np.array([max(i.image.size) for i in items])
    ratio = np.array([max(i.image.size) / min(i.image.size) for i in items])
    assert longer.min() < 300 and longer.max() > 600
    assert (ratio < 1.5).any() and (ratio > 2.0).any()
    assert {i.source_prompt.split()[-1] for i in items} == set(oracle.SHAPES_V2)


def test_exhaustive_upper_bound_fits_the_targets(results):
    assert results["exhaustive"]["iou"] >= 0.5, results


def test_rgn_reaches_the_bound_with_fewer_edits(results):
    rgn, exhaustive = results["rgn"], results["exhaustive"]
    assert rgn["iou"] >= 0.95 * exhaustive["iou"], results
    assert rgn["calls"] <= 0.40 * exhaustive["calls"], results


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


@pytest.mark.parametrize(("preset", "calls"), [("default", 19.8), ("fast", 12.0)])
def test_preset_region_choice_beats_the_papers_for_a_fraction_of_its_edits(items, preset, calls):
    # The real-model presets' search (their anchors, proposals and edit caps) against the
    # reference's proposals and learner with the same anchors and iterations, on held-out items:
    # better boxes for at most 0.2 (default) and 0.12 (fast) of the reference's 99 edits.
    chosen = _run(items[:40], **_method(preset))
    budget = {k: getattr(make_config(preset), k) for k in ("num_anchors", "iterations")}
    paper = _run(items[:40], **{**_method("reference"), **budget})
    assert chosen["iou"] >= paper["iou"] + 0.05, (chosen, paper)
    assert chosen["calls"] <= calls < paper["calls"], (chosen, paper)
