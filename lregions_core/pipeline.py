"""The method end to end for one image: features, anchors, proposals, region choice, object
masks (``region_shape`` mask/auto), selection, the final render (:func:`render_final`). Each
stage is a public function so a batch pipeline can cache stages separately; :func:`edit_image`
runs them in order.

Thread safety: the functions here keep no state between calls, so several photos may go
through them at once in different threads sharing one :class:`Models` (see
:func:`shared_models`). Each component says in its module whether it is safe to call
concurrently (feature extractors, scorers, the oracle world's components) or serialises its
calls (editors, the segmenter); ``tests/test_thread_safety.py`` compares concurrent calls of
every registered component with the same calls made one at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from lregions_core.anchors import (
    cell_centres,
    find_anchors,
    make_proposals,
    random_anchors,
    refine_cells,
)
from lregions_core.config import Config
from lregions_core.images import (
    Matte,
    box_matte,
    canvas_mask,
    changed_region,
    crop_canvas,
    input_box,
    mask_matte,
    pixel_box,
    render,
    render_geometry,
    render_region,
    to_working,
    upsample_scale,
)
from lregions_core.interfaces import (
    CandidateScores,
    Editor,
    EditRequest,
    FeatureExtractor,
    Features,
    Scorer,
    Segmenter,
)
from lregions_core.learner import Candidate, CandidateBank, RegionOutcome, choose_regions
from lregions_core.loading import heavy_import, load_once
from lregions_core.models.weights import WeightsUnavailableError
from lregions_core.registry import EDITORS, FEATURE_EXTRACTORS, SCORERS, SEGMENTERS
from lregions_core.selection import select_best, selection_scores


def register_components() -> None:
    """Import every adapter module so its components are in the registries (cheap: adapters
    import their heavy libraries only when a model is built)."""
    for module in ("clip", "dino", "editors", "segmenter"):
        heavy_import(f"lregions_core.models.{module}")
    heavy_import("lregions_core.oracle")


@dataclass
class Models:
    """The components a config names; adapters cache loaded weights per process, so building
    this twice with the same config does not reload anything. The segmenter is built only when
    ``region_shape`` needs one."""

    features: FeatureExtractor
    scorer: Scorer
    editor: Editor
    segmenter: Segmenter | None = None

    @classmethod
    def load(cls, config: Config) -> Models:
        register_components()
        needs_segmenter = config.region_shape != "box"
        return cls(
            features=FEATURE_EXTRACTORS.build(config.features, config),
            scorer=SCORERS.build(config.scorer, config),
            editor=EDITORS.build(config.editor, config),
            segmenter=SEGMENTERS.build(config.segmenter, config) if needs_segmenter else None,
        )


def shared_models(config: Config) -> Models:
    """The models ``config`` names, loaded once per process and settings, safely from any
    thread (others wait for the one load). Missing weights are remembered too: otherwise every
    row of a large batch would retry the hub (tens of seconds each offline) to fail the same
    way."""
    loaded = _shared_models(json.dumps(config.to_dict(), sort_keys=True))
    if isinstance(loaded, WeightsUnavailableError):
        raise loaded
    return loaded


@load_once(maxsize=8)
def _shared_models(config_json: str) -> Models | WeightsUnavailableError:
    try:
        return Models.load(Config(**json.loads(config_json)))
    except WeightsUnavailableError as exc:
        return exc


@dataclass
class Proposals:
    """Anchors and their boxes for one working image."""

    cells: np.ndarray  # (N, 2) grid cells (row, col)
    centres: np.ndarray  # (N, 2) working pixels (x, y)
    boxes: np.ndarray  # (N, K, 4) working pixels (x0, y0, x1, y1)


@dataclass
class EditResult:
    """Everything one edit produced. Boxes and points are given in *input* pixels unless the
    name says ``work``."""

    image: Image.Image  # final edit, input size, RGB
    layer: Image.Image  # the edit as an RGBA layer: input composited with it gives ``image``
    box: tuple[int, int, int, int]  # chosen region in input pixels (outward-rounded)
    changed_region: tuple[int, int, int, int]  # outside this rectangle output == input
    chosen: int  # index into candidates
    # One per anchor (working-size images); with region_shape "auto", each anchor's box edit
    # and then the mask edits of the anchors whose box the segmenter found the object in.
    candidates: list[Candidate]
    selection: np.ndarray  # selection score per candidate (-inf outside the top-k by text)
    anchors: np.ndarray  # (N, 2) anchor points (x, y), input pixels
    proposals: np.ndarray  # (N, K, 4) input pixels
    outcome: RegionOutcome
    work_size: tuple[int, int]
    editor_requests: int  # edits made to choose the region (the final render's: render_detail)
    denoise_steps: int
    # Why an anchor's box was not refined into a mask (no caption, nothing found): anchor -> why.
    mask_fallbacks: dict[int, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    render: str = "upsample"  # what made ``image``: "upsample" or "region" (see render_final)
    edit_scale: float = 1.0  # input pixels per editor pixel over the edited region
    render_detail: dict[str, Any] = field(default_factory=dict)  # see FinalRender.detail

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record of the result (no pixels)."""
        best = self.candidates[self.chosen]
        return {
            "box": list(self.box),
            "changed_region": list(self.changed_region),
            "anchor": best.anchor,
            "proposal": best.proposal,
            "shape": best.shape,
            "mask_fallbacks": {str(a): why for a, why in self.mask_fallbacks.items()},
            "scores": vars(best.scores).copy(),
            "loss": best.loss,
            "selection": [None if not np.isfinite(s) else float(s) for s in self.selection],
            "anchors": self.anchors.round(2).tolist(),
            "box_probs": None if self.outcome.probs is None else self.outcome.probs.round(4).tolist(),
            "param_change": self.outcome.param_change,
            "editor_requests": self.editor_requests,
            "denoise_steps": self.denoise_steps,
            "work_size": list(self.work_size),
            "render": self.render,
            "edit_scale": self.edit_scale,
            "render_detail": self.render_detail,
            "seconds": self.seconds,
        }


def extract_features(work: Image.Image, models: Models) -> Features:
    return models.features(work)


def propose(config: Config, features: Features, size: tuple[int, int], seed: int) -> Proposals:
    """Anchors (from attention, or uniformly random cells in ``random`` mode) and K boxes each."""
    if config.mode == "random":
        cells = random_anchors(features.grid, config.num_anchors, np.random.default_rng([seed, 0]))
        positions = cells  # random anchors stay uniform: no attention may pull them
    else:
        cells = find_anchors(
            features.attention,
            config.num_anchors,
            rule=config.anchor_rule,
            spread=config.anchor_spread,
            max_half_width=config.proposal_max,
        )
        positions = refine_cells(features.attention, cells) if config.anchor_refine else cells
    centres = cell_centres(positions, features.grid, size)
    boxes = make_proposals(
        centres, size, config.num_proposals, config.proposal_min, config.proposal_max,
        aspects=config.proposal_aspects, spacing=config.proposal_spacing,
    )
    return Proposals(cells=cells, centres=centres, boxes=boxes)


def find_regions(
    config: Config,
    models: Models,
    work: Image.Image,
    features: Features,
    prompt: str,
    source_prompt: str | None,
    seed: int,
) -> tuple[Proposals, RegionOutcome, CandidateBank]:
    """Anchors, proposals and one edited box per anchor (by ``config.mode``) for a working
    image; the bank holds every edit made and its cost."""
    proposals = propose(config, features, work.size, seed)
    bank = new_bank(config, models, work, prompt, source_prompt, seed)
    outcome = choose_regions(config, features, proposals.boxes, work.size, bank, seed)
    return proposals, outcome, bank


def calibration_photo(
    config: Config,
    models: Models,
    image: Image.Image,
    prompt: str,
    source_prompt: str | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """What a region prior learns from one photo: the description of every proposal (N, K, D;
    the prompt's embedding last, where the scorer gives one) and its loss (N, K), every proposal
    edited (``exhaustive``'s cost)."""
    from lregions_core.region_prior import describe, prompt_embedding

    work = to_working(image, config.work_size, config.work_multiple)
    features = extract_features(work, models)
    proposals = propose(config, features, work.size, seed)
    bank = new_bank(config, models, work, prompt, source_prompt, seed)
    n, k, _ = proposals.boxes.shape
    every = bank.fetch([(a, j, proposals.boxes[a, j]) for a in range(n) for j in range(k)])
    losses = np.array([c.loss for c in every], dtype=np.float64).reshape(n, k)
    return describe(features, proposals.boxes, work.size, prompt_embedding(bank.context)), losses


NO_CAPTION = "no source caption, so nothing to segment: the box is edited"


def object_masks(
    config: Config,
    segmenter: Segmenter,
    work: Image.Image,
    boxes: list[tuple[float, float, float, float]],
    caption: str | None,
) -> list[tuple[Image.Image | None, str | None]]:
    """For each box (working pixels), the mask of what ``caption`` names inside it, grown by
    ``mask_grow`` pixels and cut to the box (mode "L" at the working size), or None and why
    not: no caption, or no pixel of the segmenter's map above ``mask_threshold``."""
    if not caption or not caption.strip():
        return [(None, NO_CAPTION)] * len(boxes)
    rects = [pixel_box(box, work.size) for box in boxes]
    usable = [i for i, (x0, y0, x1, y1) in enumerate(rects) if x1 > x0 and y1 > y0]
    maps = dict(zip(usable, segmenter.segment([work.crop(rects[i]) for i in usable],
                                              [caption] * len(usable))))
    ndimage = heavy_import("scipy.ndimage")
    out: list[tuple[Image.Image | None, str | None]] = []
    for i, (x0, y0, x1, y1) in enumerate(rects):
        found = maps[i] >= config.mask_threshold if i in maps else np.zeros((0, 0), bool)
        if not found.any():
            why = (f"the segmenter found no {caption.strip()!r} in the box (no pixel above "
                   f"mask_threshold={config.mask_threshold}): the box is edited")
            out.append((None, why))
            continue
        if config.mask_grow > 0:
            found = ndimage.distance_transform_edt(~found) <= config.mask_grow
        full = np.zeros((work.height, work.width), np.uint8)
        full[y0:y1, x0:x1] = np.where(found, 255, 0)
        out.append((Image.fromarray(full, "L"), None))
    return out


def refine_regions(
    config: Config,
    segmenter: Segmenter,
    bank: CandidateBank,
    boxes: list[tuple[int, int, Sequence[float]]],
    caption: str | None,
) -> tuple[dict[int, Candidate], dict[int, str]]:
    """The object-mask edit of each ``(anchor, proposal, box)`` (edited and scored through
    ``bank``, in one editor call), by index into ``boxes``, and why the others have none."""
    found = object_masks(config, segmenter, bank.image, [box for *_, box in boxes], caption)
    masked = [i for i, (mask, _) in enumerate(found) if mask is not None]
    edits = bank.fetch_masked([(*boxes[i], found[i][0]) for i in masked])
    fallbacks = {i: why for i, (mask, why) in enumerate(found) if mask is None}
    return dict(zip(masked, edits)), fallbacks  # type: ignore[arg-type]


def combine_shapes(region_shape: str, boxes: int, masked: set[int] | list[int]) -> list[tuple[str, int]]:
    """The candidates selection sees, as ("box" | "mask", index of the box candidate): the boxes
    (``box``), each box replaced by its mask edit where there is one (``mask``), or the boxes
    followed by every mask edit (``auto``)."""
    if region_shape == "box":
        return [("box", i) for i in range(boxes)]
    if region_shape == "mask":
        return [("mask" if i in masked else "box", i) for i in range(boxes)]
    return [("box", i) for i in range(boxes)] + [("mask", i) for i in sorted(masked)]


def candidate_matte(
    config: Config, source_size: tuple[int, int], box_work, work_size: tuple[int, int],
    mask: Image.Image | None,
) -> Matte:
    """How much of a candidate's edit each input pixel takes: the object mask's matte (soft over
    ``mask_grow`` working pixels) for a mask edit, else the box's (``feather`` input pixels)."""
    if mask is not None:
        return mask_matte(source_size, mask, box_work, work_size, config.mask_grow)
    return box_matte(source_size, box_work, work_size, config.feather)


def new_bank(
    config: Config, models: Models, work: Image.Image, prompt: str, source_prompt: str | None,
    seed: int,
) -> CandidateBank:
    """An empty memo of edits of ``work`` for ``prompt`` (the scorer's shared context made)."""
    return CandidateBank(
        editor=models.editor,
        scorer=models.scorer,
        context=models.scorer.prepare(work, prompt, source_prompt),
        image=work,
        prompt=prompt,
        seed=seed,
        loss_weights=(config.w_clip, config.w_dir, config.w_str),
    )


def segmenter_of(config: Config, models: Models) -> Segmenter:
    """The config's segmenter (models loaded for region_shape box have none: built now)."""
    if models.segmenter is not None:
        return models.segmenter
    register_components()
    return SEGMENTERS.build(config.segmenter, config)


def select(config: Config, scores: list[CandidateScores]) -> tuple[int, np.ndarray]:
    """The final candidate by the configured quality score (see :func:`select_best`)."""
    return select_best(
        scores,
        text_weight=config.select_text_weight,
        image_weight=config.select_image_weight,
        top_k=config.select_top_k,
    )


def editor_native_size(editor: Editor, config: Config) -> int:
    """The editor's own resolution (longer side, px): its ``native_size``, or the working size
    for an editor that does not say."""
    return int(getattr(editor, "native_size", None) or config.work_size)


@dataclass
class FinalRender:
    """The final image of one edit and how it was made.

    ``render`` is "upsample" (the chosen working-size edit, upsampled bicubically to the input)
    or "region" (the chosen region edited again from a crop of the input, see
    :func:`render_final`); ``edit_scale`` is the input pixels per editor pixel of the one used
    (1.0: the edit is at the photo's own resolution). ``detail`` (JSON-ready) says why that one:
    ``setting`` (final_render), ``why``, both paths' ``edit_scale_upsample`` and
    ``edit_scale_region``, the region render's ``native_size``, ``crop``, ``scaled`` and
    ``canvas`` (see :class:`lregions_core.images.RenderGeometry`), ``editor_requests``, and
    where both were made, ``scores``: each one's scores at the working size with its
    ``selection`` score over the pair (None where outside ``select_top_k``)."""

    image: Image.Image
    layer: Image.Image | None
    render: str
    edit_scale: float
    detail: dict[str, Any]


def render_final(
    config: Config,
    models: Callable[[], Models],
    source: Image.Image,
    work_size: tuple[int, int],
    edited: Image.Image,
    box_work: Sequence[float],
    mask: Image.Image | None,
    matte: Matte,
    prompt: str,
    source_prompt: str | None,
    seed: int,
    *,
    work: Image.Image | None = None,
    context: Any = None,
    layer: bool = True,
) -> FinalRender:
    """The final image of the chosen candidate (``edited`` at ``work_size``, its box and object
    mask in working pixels, its ``matte`` on ``source``) by ``config.final_render``.

    "upsample": ``edited`` upsampled to the input and blended by the matte
    (:func:`lregions_core.images.render`). "region": the chosen region edited again, with the
    row's prompt and seed, from a crop of the input at up to the editor's own resolution
    (:func:`lregions_core.images.render_geometry`; the editor repaints the box, or the pixels
    the object mask's matte reaches), and blended by the same matte. The region render is made
    only where it is finer than the upsampled edit (smaller ``edit_scale``: not for inputs about
    the working size or smaller); both final images, brought to the working size as the working
    image was made, are then scored together (``context``: the scorer's context of the working
    image ``work``, prepared here when not given) and the selection score over the pair
    decides; ties keep the region render. ``models`` is called only for a region render."""
    up_scale = upsample_scale(source.size, work_size)
    detail: dict[str, Any] = {"setting": config.final_render, "edit_scale_upsample": up_scale,
                              "edit_scale_region": None, "editor_requests": 0}

    def upsampled(why: str) -> FinalRender:
        final, final_layer = render(source, edited, work_size, matte, layer=layer)
        return FinalRender(final, final_layer, "upsample", up_scale, {**detail, "why": why})

    if config.final_render == "upsample":
        return upsampled("final_render is upsample")
    box = input_box(source.size, box_work, work_size)
    if box is None or changed_region(matte) == (0, 0, 0, 0):
        return upsampled("the edit changes no input pixel")
    loaded = models()
    native = editor_native_size(loaded.editor, config)
    geometry = render_geometry(source.size, box, matte.region, native, config.work_multiple,
                               config.render_context)
    detail.update(native_size=native, crop=list(geometry.crop), scaled=list(geometry.scaled),
                  canvas=list(geometry.canvas), edit_scale_region=geometry.edit_scale)
    if geometry.edit_scale >= up_scale:
        return upsampled("the working edit is already as fine as a region edit would be")
    rx0, ry0, rx1, ry1 = matte.region
    if mask is None:  # the box: where the working edit repainted
        paint = np.zeros((ry1 - ry0, rx1 - rx0), bool)
        x0, y0, x1, y1 = box
        paint[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = True
    else:  # the object: every pixel its matte takes any of the edit at
        paint = matte.alpha > 0
    request = EditRequest(crop_canvas(source, geometry), canvas_mask(geometry, paint, matte.region),
                          prompt, seed)
    region_edit = loaded.editor.edit([request])[0]
    detail["editor_requests"] = 1
    final_region, layer_region = render_region(source, region_edit, geometry, matte, layer=layer)
    final_up, layer_up = render(source, edited, work_size, matte, layer=layer)  # one upsampling
    if work is None:
        work = to_working(source, config.work_size, config.work_multiple)
    if context is None:
        context = loaded.scorer.prepare(work, prompt, source_prompt)
    scored = [to_working(final, config.work_size, config.work_multiple)
              for final in (final_region, final_up)]
    found = loaded.scorer.score(context, scored, [seed, seed])
    pair = selection_scores(found, text_weight=config.select_text_weight,
                            image_weight=config.select_image_weight, top_k=config.select_top_k)
    detail["scores"] = {
        name: {**vars(sc), "selection": float(sel) if np.isfinite(sel) else None}
        for name, sc, sel in zip(("region", "upsample"), found, pair)
    }
    if pair[0] >= pair[1]:
        why = "the region render scored at least as well as the upsampled edit"
        return FinalRender(final_region, layer_region, "region", geometry.edit_scale,
                           {**detail, "why": why})
    return FinalRender(final_up, layer_up, "upsample", up_scale,
                       {**detail, "why": "the region render scored below the upsampled edit"})


def edit_image(
    image: Image.Image,
    prompt: str,
    *,
    source_prompt: str | None = None,
    config: Config | None = None,
    models: Models | None = None,
    seed: int | None = None,
) -> EditResult:
    """Edit ``image`` following ``prompt`` in a region the method finds itself.

    ``image`` may be any size and mode (it is converted to RGB); the result has the input's
    exact size, and its pixels outside ``result.changed_region`` are the input's.
    """
    if not prompt or not prompt.strip():
        raise ValueError("the edit prompt is empty")
    config = config or Config()
    seed = config.seed if seed is None else int(seed)
    models = models or Models.load(config)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 4)
        clock = now

    source = image if image.mode == "RGB" else image.convert("RGB")
    work = to_working(source, config.work_size, config.work_multiple)
    features = extract_features(work, models)
    lap("features")
    proposals, outcome, bank = find_regions(
        config, models, work, features, prompt, source_prompt, seed
    )
    lap("regions")
    candidates, fallbacks = outcome.candidates, {}
    if config.region_shape != "box":
        masked, why = refine_regions(
            config, segmenter_of(config, models), bank,
            [(c.anchor, c.proposal, c.box) for c in outcome.candidates], source_prompt)
        picks = combine_shapes(config.region_shape, len(candidates), set(masked))
        candidates = [masked[i] if kind == "mask" else outcome.candidates[i] for kind, i in picks]
        fallbacks = {outcome.candidates[i].anchor: text for i, text in why.items()}
        lap("masks")
    best, selection = select(config, [c.scores for c in candidates])
    chosen = candidates[best]
    matte = candidate_matte(config, source.size, chosen.box, work.size, chosen.mask)
    rendered = render_final(
        config, lambda: models, source, work.size, chosen.image, chosen.box, chosen.mask, matte,
        prompt, source_prompt, seed, work=work, context=bank.context)
    lap("compose")
    to_input = np.array(
        [source.width / work.width, source.height / work.height] * 2, dtype=np.float64
    )
    return EditResult(
        image=rendered.image,
        layer=rendered.layer,  # type: ignore[arg-type]  # made with layer=True
        box=input_box(source.size, chosen.box, work.size) or (0, 0, 0, 0),
        changed_region=changed_region(matte),
        chosen=best,
        candidates=candidates,
        selection=selection,
        anchors=proposals.centres * to_input[:2],
        proposals=proposals.boxes * to_input,
        outcome=outcome,
        work_size=work.size,
        editor_requests=bank.editor_requests,
        denoise_steps=bank.denoise_steps,
        mask_fallbacks=fallbacks,
        seconds=seconds,
        render=rendered.render,
        edit_scale=rendered.edit_scale,
        render_detail=rendered.detail,
    )
