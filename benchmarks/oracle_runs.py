"""One oracle-world run shared by the benchmarks: every item through ``edit_image`` with one
config, as mean box IoU with the target, mean editor calls and wall seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lregions_core.anchors import box_iou
from lregions_core.config import Config
from lregions_core.pipeline import Models, edit_image


@dataclass(frozen=True)
class Item:
    image: Image.Image
    prompt: str
    source: str | None
    seed: int
    target_box: tuple


def box_quality_items(config: Config, items: list[Item]) -> tuple[np.ndarray, np.ndarray, float]:
    """Per item: box IoU with the target and editor calls of ``config``; and the seconds taken."""
    models = Models.load(config)
    ious, calls = [], []
    start = time.perf_counter()
    for item in items:
        result = edit_image(item.image, item.prompt, source_prompt=item.source, config=config,
                            models=models, seed=item.seed)
        ious.append(float(box_iou(np.array(result.box), np.array(item.target_box))))
        calls.append(result.editor_requests)
    return np.array(ious), np.array(calls, dtype=float), time.perf_counter() - start


def box_quality(config: Config, items: list[Item]) -> tuple[float, float, float]:
    """(mean box IoU with the target, mean editor calls, seconds) of ``config`` on ``items``."""
    ious, calls, seconds = box_quality_items(config, items)
    return float(ious.mean()), float(calls.mean()), seconds


def v2_items(seeds, *, wide: bool = True) -> list[Item]:
    """Oracle world v2 items for ``seeds`` (each item's seed is its own)."""
    from lregions_core import oracle

    made = [(seed, oracle.make_item_v2(seed, wide=wide)) for seed in seeds]
    return [Item(v.image, v.prompt, v.source_prompt, seed, v.target_box) for seed, v in made]


def world_config(preset: str, **extra) -> Config:
    """``preset``'s region-choice method (anchors, proposals, learner, steps) in the oracle world
    (saliency, painter, exact judge, working size of the ``oracle`` preset), then ``extra``."""
    from lregions_core.config import REGION_CHOICE_KEYS, make_config, preset_settings

    keys = (*REGION_CHOICE_KEYS, "editor_steps")
    base = make_config(preset)
    world = {k: v for k, v in preset_settings("oracle").items() if k not in keys}
    method = {k: getattr(base, k) for k in keys}
    return make_config("default", {**world, **method, "final_render": "upsample", **extra})


# Seeds of the region priors' calibration items (wide v2 generator): disjoint from every item
# set a figure is reported on.
CALIBRATION_START = 7000


def fit_prior(preset: str, count: int, location: str) -> dict:
    """Fit a region prior for ``preset``'s proposals on ``count`` calibration items (every
    proposal edited, in the oracle world) and save it at ``location``; returns its JSON."""
    from lregions_core.pipeline import calibration_photo
    from lregions_core.region_prior import fit, save_prior

    config = world_config(preset, mode="exhaustive")
    models = Models.load(config)
    photos = [calibration_photo(config, models, item.image, item.prompt, item.source, item.seed)
              for item in v2_items(range(CALIBRATION_START, CALIBRATION_START + count))]
    return save_prior(fit(photos, config), location)
