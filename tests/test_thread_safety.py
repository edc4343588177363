"""Every registered component, the evaluator and the region learner, called from several threads
at once on inputs of their own (some of one size, some of others): each concurrent result must
be the bits the same call gives alone (see :mod:`lregions_core.threadcheck`). The batch's task
threads share one loaded model per component, so a component that keeps per-call state on it
would hand one photo another photo's result, silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import noise_image
from PIL import Image

from lregions_core import oracle
from lregions_core.config import make_config
from lregions_core.images import to_working
from lregions_core.interfaces import EditRequest
from lregions_core.metrics import Evaluator
from lregions_core.pipeline import Models, find_regions, register_components
from lregions_core.registry import EDITORS, FEATURE_EXTRACTORS, SCORERS, SEGMENTERS
from lregions_core.threadcheck import concurrent_mismatches, same

THREADS, CALLS = 6, 4
# Three inputs share one size (where a mix-up raises no shape error), three have others.
SIZES = [(96, 96), (96, 96), (96, 96), (96, 64), (64, 96), (80, 48)]
WORK_SIZES = [(64, 64), (64, 64), (64, 64), (64, 48), (48, 64), (64, 32)]


def tiny(**overrides):
    return make_config("tiny", overrides)


def oracle_config(**overrides):
    return make_config("oracle", {"oracle_noise": 0.1, **overrides})


def images(sizes) -> list[Image.Image]:
    return [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def requests(sizes) -> list[EditRequest]:
    out = []
    for i, image in enumerate(images(sizes)):
        mask = Image.new("L", image.size, 0)
        mask.paste(255, (8, 8, image.width - 8 * (1 + i % 2), image.height - 16))
        colour = list(oracle.COLOURS)[i % len(oracle.COLOURS)]
        out.append(EditRequest(image, mask, f"a {colour} thing number {i}", seed=i))
    return out


def extractor(name: str, config) -> Callable[[int], Any]:
    model, inputs = FEATURE_EXTRACTORS.build(name, config), images(SIZES)
    return lambda i: model(inputs[i])


def scorer(name: str, config) -> Callable[[int], Any]:
    """prepare (text and source embeddings) and score (augmented views) of each input."""
    model, inputs = SCORERS.build(name, config), images(WORK_SIZES)
    others = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in inputs]

    def call(i: int) -> Any:
        context = model.prepare(inputs[i], f"a red thing number {i}", "a blue thing")
        return model.score(context, [others[i], inputs[i]], [10 * i, 10 * i + 1])

    return call


def editor(name: str, config) -> Callable[[int], Any]:
    model, inputs = EDITORS.build(name, config), requests(WORK_SIZES)
    return lambda i: model.edit([inputs[i]])


def segmenter(name: str, config) -> Callable[[int], Any]:
    model, inputs = SEGMENTERS.build(name, config), images(WORK_SIZES)
    return lambda i: model.segment([inputs[i]], [f"a red thing number {i}"])


# Registered name -> (kind, settings): every registered component must be here.
COMPONENTS: dict[str, tuple[Callable, Callable[[], Any]]] = {
    "dino": (extractor, tiny),
    "oracle-saliency": (extractor, oracle_config),
    "clip": (scorer, tiny),
    "oracle": (scorer, oracle_config),
    "sd-inpaint": (editor, tiny),
    "amused": (editor, lambda: tiny(editor="amused")),
    "sdxl-inpaint": (editor, lambda: tiny(editor="sdxl-inpaint")),
    "flux-fill": (editor, lambda: tiny(editor="flux-fill")),
    "oracle-painter": (editor, oracle_config),
    "clipseg": (segmenter, tiny),
    "oracle-segmenter": (segmenter, oracle_config),
}


def test_every_registered_component_is_checked():
    register_components()
    registered = {*FEATURE_EXTRACTORS.names(), *SCORERS.names(), *EDITORS.names(),
                  *SEGMENTERS.names()}
    assert registered == set(COMPONENTS)


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_component_gives_each_thread_its_own_result(name):
    register_components()
    kind, settings = COMPONENTS[name]
    call = kind(name, settings())
    assert not same(call(0), call(3))  # the inputs differ, so a mix-up would show
    wrong = concurrent_mismatches(call, THREADS, CALLS)
    assert wrong == [], f"{len(wrong)} of {THREADS * CALLS} concurrent calls: {wrong[:3]}"


def test_evaluator_gives_each_thread_its_own_metrics():
    """CLIP metrics, background (LPIPS included) and DINO structure distance."""
    evaluator = Evaluator(tiny())
    sources = images(SIZES)
    finals = [image.transpose(Image.Transpose.FLIP_TOP_BOTTOM) for image in sources]

    def call(i: int) -> dict:
        found = evaluator.evaluate(sources[i], finals[i], prompt=f"a red thing {i}",
                                   source_prompt="a thing", box=(8, 8, 40, 40))
        assert found["missing"] == {name: found["missing"][name] for name in found["missing"]
                                    if name.startswith(("box", "changed", "pie_"))}
        return found["metrics"]

    wrong = concurrent_mismatches(call, THREADS, CALLS)
    assert wrong == [], f"{len(wrong)} of {THREADS * CALLS} concurrent calls: {wrong[:3]}"


@pytest.mark.parametrize("settings", [oracle_config, tiny], ids=["oracle", "tiny"])
def test_region_learning_gives_each_thread_its_own_boxes(settings):
    """Anchors, proposals and the region network's learning (its initial weights drawn under a
    seed) for several photos at once."""
    config = settings()

    models = Models.load(config)
    items = [oracle.make_item_v2(i) for i in range(THREADS)]
    work = [to_working(item.image, config.work_size, config.work_multiple) for item in items]
    feats = [models.features(image) for image in work]

    def call(i: int) -> Any:
        proposals, outcome, bank = find_regions(config, models, work[i], feats[i], items[i].prompt,
                                                items[i].source_prompt, seed=i)
        return {"boxes": proposals.boxes, "chosen": [c.box for c in outcome.candidates],
                "losses": [c.loss for c in outcome.candidates], "probs": outcome.probs,
                "requests": bank.editor_requests}

    wrong = concurrent_mismatches(call, THREADS, 2)
    assert wrong == [], f"{len(wrong)} of {THREADS * 2} concurrent calls: {wrong[:3]}"


def test_same_compares_bits():
    a = np.zeros(3, np.float32)
    b = a.copy()
    b[1] = np.nextafter(np.float32(0), np.float32(1))
    assert same({"x": [a]}, {"x": [a.copy()]}) and not same({"x": [a]}, {"x": [b]})
    assert not same(a, a.astype(np.float64)) and same(float("nan"), float("nan"))
