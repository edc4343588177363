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


def box_quality(config: Config, items: list[Item]) -> tuple[float, float, float]:
    """(mean box IoU with the target, mean editor calls, seconds) of ``config`` on ``items``."""
    models = Models.load(config)
    ious, calls = [], []
    start = time.perf_counter()
    for item in items:
        result = edit_image(item.image, item.prompt, source_prompt=item.source, config=config,
                            models=models, seed=item.seed)
        ious.append(float(box_iou(np.array(result.box), np.array(item.target_box))))
        calls.append(result.editor_requests)
    return float(np.mean(ious)), float(np.mean(calls)), time.perf_counter() - start
