"""What ``bench_gpu.py`` runs: its configurations, the reference procedure, and the timed photo.

The reference procedure is the public implementation's work per photo, built from this
project's components: (iterations + 1) editor calls that each edit one box per anchor in one
batch, with the default scheduler and 50 steps, no memo (boxes tried before are edited again),
the prompt encoded on every call (as diffusers does by itself), and every candidate scored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lregions_core import profiling
from lregions_core.config import Config, make_config, preset_settings
from lregions_core.images import box_mask, load_image, paste_back, to_working
from lregions_core.interfaces import EditRequest
from lregions_core.pipeline import Models, edit_image, propose, select
from lregions_core.profiling import PhaseTimer

PHOTOS = (  # scikit-image sample photos: (name, prompt, source caption)
    ("chelsea", "a cat wearing a red hat", "a cat"),
    ("coffee", "a cup of green tea", "a cup of coffee"),
    ("astronaut", "an astronaut holding a bouquet of flowers", "an astronaut"),
    ("rocket", "a rocket made of gold", "a rocket"),
)
MODES = ("rgn", "exhaustive", "dino-random")
# --small takes these from the tiny preset (its models and 64 px images) and keeps the rest of
# each preset (anchors, proposals, iterations, views, scheduler), with the steps scaled.
TINY_MODEL_KEYS = (
    "feature_model", "feature_kwargs", "feature_size", "clip_model", "clip_pretrained",
    "clip_kwargs", "clip_structure_layer", "editor_kwargs", "work_size", "work_multiple",
)
SMALL_STEP_SCALE = 0.04  # 50 steps -> 2, 25 -> 1
REFERENCE_STEPS = 50
Procedure = Callable[..., tuple[Image.Image, list[Image.Image]]]


def bench_config(options: Any, preset: str, **changes: Any) -> Config:
    """``preset`` with random weights at real size or, when ``options.small``, the tiny
    preset's models; ``options`` also carries ``device`` and ``dtype``."""
    config = make_config(preset, {"random_weights": True, **changes})
    if options.small:
        tiny = preset_settings("tiny")
        steps = max(1, round(config.editor_steps * SMALL_STEP_SCALE))
        config = config.replace(**{k: tiny[k] for k in TINY_MODEL_KEYS}, editor_steps=steps)
    return config.replace(device=options.device, dtype=options.dtype)


def reference_config(options: Any) -> Config:
    """The paper's method (the ``reference`` preset), one editor call per iteration holding every
    anchor's box: edit_batch = anchors."""
    config = bench_config(options, "reference", editor_scheduler="default",
                          editor_steps=REFERENCE_STEPS)
    return config.replace(edit_batch=config.num_anchors)


def reference_models(config: Config) -> Models:
    models = Models.load(config)
    models.editor.reuse_prompt_embeddings = False  # type: ignore[attr-defined]
    return models


def ours(image: Image.Image, prompt: str, source: str | None, config: Config, models: Models,
         seed: int) -> tuple[Image.Image, list[Image.Image]]:
    """lregions' own procedure (``config.mode``): the final image and the candidates kept."""
    result = edit_image(image, prompt, source_prompt=source, config=config, models=models,
                        seed=seed)
    return result.image, [c.image for c in result.candidates]


def reference_procedure(image: Image.Image, prompt: str, source: str | None, config: Config,
                        models: Models, seed: int) -> tuple[Image.Image, list[Image.Image]]:
    """The reference's work (see the module docstring). Its region network never learns (see
    the README), so the box each anchor gets per call is drawn uniformly here."""
    work = to_working(image, config.work_size, config.work_multiple)
    proposals = propose(config, models.features(work), work.size, seed)
    context = models.scorer.prepare(work, prompt, source)
    rng = np.random.default_rng(seed)
    n, k, _ = proposals.boxes.shape
    for _ in range(config.iterations + 1):
        boxes = [tuple(proposals.boxes[a, j]) for a, j in enumerate(rng.integers(0, k, n))]
        edited = models.editor.edit(
            [EditRequest(work, box_mask(work.size, box), prompt, seed) for box in boxes]
        )
        scores = models.scorer.score(context, edited, [seed] * n)
    best, _ = select(config, scores)
    final = paste_back(image, edited[best], boxes[best], work.size, config.feather)
    return final, edited


@dataclass
class PhotoRun:
    """One photo's measurements: wall seconds, exclusive phase seconds, counters, peak memory
    (see :func:`lregions_core.profiling.peak_memory_gib` for what it means on a CPU)."""

    wall: float
    seconds: dict[str, float]
    counts: dict[str, float]
    peak_gib: float


def time_photo(procedure: Procedure, config: Config, models: Models, timer: PhaseTimer,
               photo: tuple[Path, str, str], out: Path) -> PhotoRun:
    """One photo, read from and written to disk (the I/O phase), every phase timed. ``models``
    are the :func:`~lregions_core.profiling.instrument` ones reporting to ``timer``."""
    path, prompt, source = photo
    device = torch.device(config.device_resolved)
    timer.reset()
    profiling.reset_peak_memory(device)
    start = time.perf_counter()
    with timer.phase("learner"):  # the outer phase: whatever no inner phase claims
        with timer.phase("io"):
            image = load_image(str(path))
        final, candidates = procedure(image, prompt, source, config, models, 0)
        with timer.phase("io"):
            final.save(out / "final.png")
            for i, candidate in enumerate(candidates):
                candidate.save(out / f"cand_{i:02d}.png")
    wall = time.perf_counter() - start
    timer.settle()
    return PhotoRun(wall, dict(timer.seconds), dict(timer.counts),
                    profiling.peak_memory_gib(device))


def anchor_requests(config: Config, models: Models, photo: tuple[Path, str, str],
                    calls: int) -> list[list[EditRequest]]:
    """``calls`` editor calls as the learner makes them: one box per anchor each, a different
    proposal per call (so a memo would not skip any)."""
    path, prompt, _ = photo
    work = to_working(load_image(str(path)), config.work_size, config.work_multiple)
    boxes = propose(config, models.features(work), work.size, 0).boxes
    n, k, _ = boxes.shape
    return [[EditRequest(work, box_mask(work.size, boxes[a, (c + a) % k]), prompt, 0)
             for a in range(n)] for c in range(calls)]


def warm_up(models: Models, config: Config, photo: tuple[Path, str, str]) -> None:
    """First calls pay one-off costs (kernel selection, lazy initialisation): not timed."""
    (requests,) = anchor_requests(config, models, photo, 1)
    edited = models.editor.edit(requests[:1])
    work = requests[0].image
    models.scorer.score(models.scorer.prepare(work, "warm-up", None), edited, [0])


def time_calls(editor: Any, calls: Sequence[Sequence[EditRequest]],
               device: torch.device) -> tuple[float, float]:
    """(seconds per request, peak GiB) of the editor working through ``calls``."""
    profiling.reset_peak_memory(device)
    profiling.synchronize(device)
    start = time.perf_counter()
    for requests in calls:
        editor.edit(requests)
    profiling.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds / sum(len(c) for c in calls), profiling.peak_memory_gib(device)
