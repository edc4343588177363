"""The method split into cacheable stages for batch runs: ingest, features, regions, masks,
select, outputs, evaluate. Each stage stores its large results itself (PNG, JSON, Parquet) at an address
made of content hashes, the settings that stage reads (:data:`STAGE_SETTINGS`) and the library
version, so a finished stage is found again after a restart and a changed setting recomputes only
the stages that read it. Stages pass small JSON-ready dicts between them.

Every pixel is stored once: the normalised input in ``cache/images/``, each candidate edit in
``cache/regions/<key>/`` (boxes) or ``cache/masks/<key>/`` (object-mask edits and their masks,
``region_shape`` mask/auto). An item (``items/<id>/``) holds its final image, its edit layer
(``layer.png``, ``keep_layers``), an overlay and ``result.json``, whose ``input``, ``mask`` and
``candidates[i].image`` refer to those files by paths relative to the item's folder
(``keep_candidates`` decides which candidates stay).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lregions_core import pipeline
from lregions_core.config import Config
from lregions_core.images import (
    ImageLoadError,
    changed_region,
    input_box,
    load_image,
    read_source,
    to_working,
)
from lregions_core.interfaces import CandidateScores, Features
from lregions_core.loading import heavy_import
from lregions_core.manifest import ManifestRow
from lregions_core.metrics import METRICS
from lregions_core.region_prior import load_prior
from lregions_core.store import Store, encode_png

FEATURE_SETTINGS = (
    "features", "feature_model", "feature_size", "feature_kwargs", "random_weights",
    "work_size", "work_multiple",
)
REGION_SETTINGS = FEATURE_SETTINGS + (
    "scorer", "clip_model", "clip_pretrained", "clip_kwargs", "clip_views",
    "clip_structure_layer", "editor", "editor_model", "editor_steps", "guidance_scale",
    "editor_scheduler", "vae_tiling",
    "prompt_template", "editor_kwargs", "num_anchors", "anchor_rule", "anchor_spread",
    "anchor_refine",
    "num_proposals", "proposal_min", "proposal_max", "proposal_aspects", "proposal_spacing",
    "oracle_noise", "mode", "roi_size", "rgn_hidden",
    "iterations", "lr", "tau", "estimator", "rgn_context", "rgn_steps", "rgn_sampling",
    "rgn_settle", "rgn_focus", "rgn_warmup", "rgn_patience", "rgn_final", "rgn_noise",
    "rgn_acquisition", "rgn_kappa", "rgn_halving", "rgn_confidence", "rgn_budget", "rgn_init",
    "region_prior", "w_clip", "w_dir", "w_str",
)
# The object masks inside each anchor's box and their edits (region_shape mask/auto); mask and
# auto share them, region_shape itself decides only what selection sees.
MASK_SETTINGS = ("segmenter", "segmenter_model", "segmenter_kwargs", "mask_threshold", "mask_grow")
SELECT_SETTINGS = ("region_shape", "select_text_weight", "select_image_weight", "select_top_k")
# The final render: with final_render "region" the editor and the scorer run again here, on the
# models the regions stage's settings name (part of the item key through the regions key).
OUTPUT_SETTINGS = ("feather", "keep_candidates", "keep_layers", "final_render", "render_context")
# What an item folder holds and how result.json refers to pixels. Part of the item key: items
# written in an older layout are written again (features and regions are reused).
ITEM_LAYOUT = 3
# Settings that change where or how fast work runs, not its result.
OPERATIONAL_SETTINGS = (
    "device", "dtype", "weights_dir", "edit_batch", "vae_slicing", "compile_unet", "seed",
    "editor_offload",
)
STAGE_SETTINGS = {
    "features": FEATURE_SETTINGS,
    "regions": REGION_SETTINGS,
    "masks": MASK_SETTINGS,
    "select": SELECT_SETTINGS,
    "outputs": OUTPUT_SETTINGS,
}


def library_version() -> str:
    try:
        return metadata.version("lregions")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_key(stage: str, config: Config, *content: Any) -> str:
    """The cache address of one stage's result for ``content`` (hashes of its inputs)."""
    return _hash(stage, config.digest(STAGE_SETTINGS[stage]), library_version(), *content)


def row_seed(row: ManifestRow, config: Config) -> int:
    return config.seed if row.seed is None else int(row.seed)


def plan(row: ManifestRow, image_hash: str, config: Config) -> dict:
    """Every stage's cache key for one row, from hashes alone (no model runs): a rerun can tell
    a finished item without loading any model."""
    features_key = stage_key("features", config, image_hash)
    # A region prior enters by its content (its digest), not only its location.
    prior = [load_prior(config.region_prior).digest] if config.region_prior else []
    regions_key = stage_key("regions", config, features_key, row.prompt, row.source,
                            row_seed(row, config), *prior)
    masks_key = stage_key("masks", config, regions_key) if config.region_shape != "box" else None
    return {
        "features_key": features_key,
        "regions_key": regions_key,
        "masks_key": masks_key,
        "item_key": _hash(regions_key, masks_key, config.digest(SELECT_SETTINGS + OUTPUT_SETTINGS),
                          library_version(), ITEM_LAYOUT),
    }


# -- ingest -------------------------------------------------------------------------------------
def ingest(row: ManifestRow, store: Store) -> dict:
    """Hash the image's bytes and store it once, normalised to RGB PNG, by that hash."""
    raw = read_source(row.image)
    blob = raw.tobytes() + str(raw.shape).encode() if isinstance(raw, np.ndarray) else raw
    image_hash = hashlib.sha256(blob).hexdigest()[:20]
    rel = f"cache/images/{image_hash}.png"
    if not store.exists(rel):
        if isinstance(raw, np.ndarray):
            image = Image.fromarray(raw).convert("RGB")
        else:
            try:
                image = load_image(raw)
            except ImageLoadError as exc:  # name the manifest's file, not "<bytes>"
                raise ImageLoadError(row.image, exc.problem) from None
        store.write_png(rel, image)
    return {"image_hash": image_hash, "image_path": rel}


# What reading a stored stage result raises when the file is damaged (truncated, not PNG, JSON
# or Parquet, or not the layout written) or gone: PIL, json, pandas and pyarrow raise these.
UNREADABLE = (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError,
              SyntaxError)


# -- features -----------------------------------------------------------------------------------
def features(state: dict, config: Config, store: Store, models: Callable) -> dict:
    """DINO attention and patch features of the working image, one Parquet file per image and
    feature model. A stored file is trusted by its name here; the regions stage, which reads
    it, computes it again when it cannot be read (:func:`read_features`)."""
    rel = f"cache/features/{state['image_hash']}-{state['features_key']}.parquet"
    if not store.exists(rel):
        _write_features(rel, state, config, store, models)
    return {"features_path": rel}


def _write_features(rel: str, state: dict, config: Config, store: Store, models: Callable
                    ) -> None:
    pd = heavy_import("pandas")
    feats = models().features(_working(state, config, store))
    frame = pd.DataFrame(
        {
            "attention": [feats.attention.astype(np.float32).ravel()],
            "patches": [feats.patches.astype(np.float32).ravel()],
            "channels": [feats.patches.shape[0]],
            "grid_h": [feats.grid[0]],
            "grid_w": [feats.grid[1]],
            "feature_model": [config.feature_model],
        }
    )
    store.write_parquet(rel, frame)


def read_features(state: dict, config: Config, store: Store, models: Callable) -> Features:
    """The row's stored features (see :func:`features`). A file that cannot be read (truncated,
    not Parquet) is computed again and overwritten: a damaged cache costs a recomputation, not
    the row."""
    rel = state["features_path"]
    try:
        return load_features(store, rel)
    except UNREADABLE:
        _write_features(rel, state, config, store, models)
        return load_features(store, rel)


def load_features(store: Store, rel: str) -> Features:
    row = store.read_parquet(rel).iloc[0]
    gh, gw, c = int(row["grid_h"]), int(row["grid_w"]), int(row["channels"])
    return Features(
        attention=np.asarray(row["attention"], np.float32).reshape(gh, gw),
        patches=np.asarray(row["patches"], np.float32).reshape(c, gh, gw),
    )


# -- regions (the GPU stage) --------------------------------------------------------------------
def regions_folder(state: dict) -> str:
    """Where the regions stage of a planned row (see :func:`plan`) keeps its candidates."""
    return f"cache/regions/{state['image_hash']}-{state['regions_key']}"


def candidate_png(regions_path: str, index: int) -> str:
    return f"{regions_path}/cand_{index:02d}.png"


def mask_png(masks_path: str, index: int) -> str:
    return f"{masks_path}/mask_{index:02d}.png"


def _complete(store: Store, folder: str, summary: str, pngs: Callable[[dict], list[str]]) -> bool:
    """A stage's folder is complete when its ``summary`` JSON (written last) can be read and
    every image ``pngs(summary)`` names is there, with the byte size the summary recorded
    (``sizes``; summaries without it are checked by name only): a truncated image is found
    from the file system's metadata, without decoding it. ``keep_candidates`` may have pruned
    images since. An incomplete folder is computed again and overwritten."""
    names = set(store.listdir(folder))
    if summary not in names:
        return False
    try:
        found = store.read_json(f"{folder}/{summary}")
        wanted = [posixpath.basename(png) for png in pngs(found)]
        sizes = found.get("sizes") or {}
        # (a file another thread or process removes meanwhile reads as incomplete too)
        return all(name in names and (name not in sizes or store.size(f"{folder}/{name}")
                                      == sizes[name]) for name in wanted)
    except UNREADABLE:
        return False


def _write_pngs(store: Store, images: list[tuple[str, Image.Image]]) -> dict[str, int]:
    """Write each ``(rel, image)`` as PNG; returns file name -> byte size, for the stage's
    summary (see :func:`_complete`)."""
    sizes = {}
    for rel, image in images:
        data = encode_png(image)
        store.write_bytes(rel, data)
        sizes[posixpath.basename(rel)] = len(data)
    return sizes


def _regions_complete(store: Store, folder: str) -> bool:
    return _complete(store, folder, "candidates.json", lambda found: [
        candidate_png(folder, i) for i in range(len(found["candidates"]))])


def regions(
    row: ManifestRow, state: dict, config: Config, store: Store, models: Callable
) -> dict:
    """Anchors, proposals and region choice; every candidate's pixels and scores are stored."""
    seed = row_seed(row, config)
    folder = regions_folder(state)
    if _regions_complete(store, folder):
        return {"regions_path": folder}
    loaded = models()
    work = _working(state, config, store)
    feats = read_features(state, config, store, models)
    proposals, outcome, bank = pipeline.find_regions(
        config, loaded, work, feats, row.prompt, row.source, seed
    )
    sizes = _write_pngs(store, [(candidate_png(folder, i), cand.image)
                                for i, cand in enumerate(outcome.candidates)])
    records = [{"anchor": cand.anchor, "proposal": cand.proposal, "box": cand.box,
                "loss": cand.loss, "scores": vars(cand.scores)} for cand in outcome.candidates]
    store.write_json(
        f"{folder}/candidates.json",
        {
            "candidates": records,
            "sizes": sizes,
            "work_size": list(work.size),
            "anchors": proposals.centres,
            "proposals": proposals.boxes,
            "probs": outcome.probs,
            "param_change": outcome.param_change,
            "editor_requests": bank.editor_requests,
            "denoise_steps": bank.denoise_steps,
        },
    )
    return {"regions_path": folder}


def _working(state: dict, config: Config, store: Store) -> Image.Image:
    return to_working(store.read_png(state["image_path"]), config.work_size, config.work_multiple)


# -- masks (region_shape mask/auto; on the GPU stage's workers) ---------------------------------
def masks_folder(state: dict) -> str | None:
    """Where the masks stage of a planned row keeps its edits, or None with region_shape box."""
    if not state.get("masks_key"):
        return None
    return f"cache/masks/{state['image_hash']}-{state['masks_key']}"


def masks(row: ManifestRow, state: dict, config: Config, store: Store, models: Callable) -> dict:
    """Each anchor's box refined into the mask of what the source caption names inside it, and
    that mask edited and scored (see :func:`pipeline.refine_regions`); boxes where the segmenter
    found nothing, or every box without a caption, keep the box and say why (``fallbacks``)."""
    folder = masks_folder(state)
    if folder is None:
        return {"masks_path": None}

    def pngs(found: dict) -> list[str]:
        return [p for c in found["candidates"]
                for p in (candidate_png(folder, c["source"]), mask_png(folder, c["source"]))]

    if _complete(store, folder, "masks.json", pngs):
        return {"masks_path": folder}
    boxes = store.read_json(f"{state['regions_path']}/candidates.json")["candidates"]
    loaded = models()
    bank = pipeline.new_bank(config, loaded, _working(state, config, store), row.prompt,
                             row.source, row_seed(row, config))
    segmenter = pipeline.segmenter_of(config, loaded)
    masked, fallbacks = pipeline.refine_regions(
        config, segmenter, bank, [(c["anchor"], c["proposal"], c["box"]) for c in boxes],
        row.source)
    done = sorted(masked.items())
    sizes = _write_pngs(store, [png for i, cand in done for png in (
        (candidate_png(folder, i), cand.image), (mask_png(folder, i), cand.mask))])
    records = [{"source": i, "anchor": cand.anchor, "proposal": cand.proposal, "box": cand.box,
                "loss": cand.loss, "scores": vars(cand.scores)} for i, cand in done]
    store.write_json(f"{folder}/masks.json", {
        "candidates": records,
        "sizes": sizes,
        "fallbacks": {str(i): why for i, why in fallbacks.items()},
        "editor_requests": bank.editor_requests,
        "denoise_steps": bank.denoise_steps,
    })
    return {"masks_path": folder}


# -- selection and outputs ----------------------------------------------------------------------
def candidates_of(state: dict, config: Config, store: Store) -> tuple[list[dict], dict, dict]:
    """The candidates selection sees (``region_shape``, see :func:`pipeline.combine_shapes`),
    each a record with ``shape``, ``path`` (its image) and ``mask_path`` (None for a box); the
    regions stage's summary; the masks stage's (empty with region_shape box)."""
    found = store.read_json(f"{state['regions_path']}/candidates.json")
    boxes = [{**c, "shape": "box", "path": candidate_png(state["regions_path"], i),
              "mask_path": None} for i, c in enumerate(found["candidates"])]
    folder = state.get("masks_path")
    refined = store.read_json(f"{folder}/masks.json") if folder else {"candidates": []}
    masked = {c["source"]: {**c, "shape": "mask", "path": candidate_png(folder, c["source"]),
                            "mask_path": mask_png(folder, c["source"])}
              for c in refined["candidates"]}
    picks = pipeline.combine_shapes(config.region_shape, len(boxes), set(masked))
    return [masked[i] if kind == "mask" else boxes[i] for kind, i in picks], found, refined


def select(state: dict, config: Config, store: Store) -> dict:
    cands, _, _ = candidates_of(state, config, store)
    best, selection = pipeline.select(config, [CandidateScores(**c["scores"]) for c in cands])
    return {"chosen": best, "selection": [float(s) if np.isfinite(s) else None for s in selection]}


def overlay(image: Image.Image, anchors: np.ndarray, boxes: list, chosen: int) -> Image.Image:
    """Anchors (dots) and every candidate's box on the input; the chosen one thicker, in red."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(min(image.size) / 150))
    for i, box in enumerate(boxes):
        draw.rectangle(box, outline=(255, 40, 40) if i == chosen else (255, 220, 0),
                       width=width * (3 if i == chosen else 1))
    r = 2 * width + 1
    for x, y in anchors:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(0, 200, 255), outline=(0, 0, 0))
    return canvas


def kept_candidates(keep: str, count: int, chosen: int) -> list[int]:
    """Indices of the candidate images an item keeps under ``keep_candidates=keep``."""
    return {"all": list(range(count)), "chosen": [chosen], "none": []}[keep]


def item_ref(items: str, item_id: str, rel: str) -> str:
    """``rel`` (relative to the output folder) as a path relative to the item's folder."""
    return posixpath.relpath(rel, f"{items}/{item_id}")


def resolve_ref(items: str, item_id: str, ref: str) -> str:
    """The inverse of :func:`item_ref`: a reference in ``result.json`` as a path relative to the
    output folder (:class:`Store` refuses one that leaves it)."""
    return posixpath.normpath(f"{items}/{item_id}/{ref}")


def outputs(
    row: ManifestRow, state: dict, config: Config, store: Store, items: str = "items",
    models: Callable | None = None,
) -> dict:
    """``<items>/<id>/``: overlay, edit layer (``keep_layers``), final image, then result.json
    (last, so its presence means the item is complete). The input, the candidates and the chosen
    object mask are referred to, not copied. ``final_path`` is relative to the folder holding
    ``items`` (where that run's index goes).

    The final image is rendered by ``final_render`` (:func:`pipeline.render_final`); a
    "region" render edits the chosen region again with the process's shared models
    (``models``, called only then; by default :func:`pipeline.shared_models`), and
    result.json says which render made the final image (``render``), its ``edit_scale`` and
    why (``render_detail``)."""
    item = f"{items}/{row.id}"
    cands, found, refined = candidates_of(state, config, store)
    source = store.read_png(state["image_path"])
    work_size = tuple(found["work_size"])
    chosen = state["chosen"]
    best = cands[chosen]
    edited = store.read_png(best["path"])
    mask = store.read_png(best["mask_path"], mode="L") if best["mask_path"] else None
    matte = pipeline.candidate_matte(config, source.size, best["box"], work_size, mask)
    rendered = pipeline.render_final(
        config, models or (lambda: pipeline.shared_models(config)), source, work_size, edited,
        best["box"], mask, matte, row.prompt, row.source, row_seed(row, config),
        layer=config.keep_layers)
    final, layer = rendered.image, rendered.layer
    to_input = [source.width / work_size[0], source.height / work_size[1]] * 2
    boxes_in = [[v * s for v, s in zip(c["box"], to_input)] for c in cands]
    anchors_in = np.asarray(found["anchors"]) * np.asarray(to_input[:2])
    store.write_png(f"{item}/overlay.png", overlay(source, anchors_in, boxes_in, chosen))
    if config.keep_layers:
        store.write_png(f"{item}/layer.png", layer)
    elif store.exists(f"{item}/layer.png"):  # an earlier run's layer would not match this edit
        store.remove([f"{item}/layer.png"])
    store.write_png(f"{item}/final.png", final)
    box = list(input_box(source.size, best["box"], work_size) or (0, 0, 0, 0))
    kept = kept_candidates(config.keep_candidates, len(cands), chosen)

    def ref(rel: str | None) -> str | None:
        return None if rel is None else item_ref(items, row.id, rel)

    fallbacks = {str(found["candidates"][int(i)]["anchor"]): why
                 for i, why in refined.get("fallbacks", {}).items()}
    result = {
        "id": row.id,
        "item_key": state["item_key"],
        "manifest_row": row.to_record(),
        "input": item_ref(items, row.id, state["image_path"]),
        "regions_path": state["regions_path"],
        "masks_path": state.get("masks_path"),
        "box": box,
        "changed_region": list(changed_region(matte)),
        "region_shape": config.region_shape,
        "shape": best["shape"],
        "mask": ref(best["mask_path"]),
        # anchor -> why its box was not refined into a mask (no caption, nothing found)
        "mask_fallbacks": fallbacks,
        "layer": "layer.png" if config.keep_layers else None,
        # what made final.png: "upsample" (the working edit upsampled) or "region" (the chosen
        # region edited again from the input), and input pixels per editor pixel over the edit
        "render": rendered.render,
        "edit_scale": rendered.edit_scale,
        "render_detail": rendered.detail,
        "chosen": chosen,
        "scores": best["scores"],
        "loss": best["loss"],
        "selection": state["selection"],
        "candidates": [{"anchor": c["anchor"], "proposal": c["proposal"], "box": c["box"],
                        "loss": c["loss"], "scores": c["scores"], "shape": c["shape"],
                        "box_input": b, "image": ref(c["path"]) if i in kept else None,
                        "mask": ref(c["mask_path"]), "path": c["path"]}
                       for i, (c, b) in enumerate(zip(cands, boxes_in))],
        "keep_candidates": config.keep_candidates,
        "anchors": anchors_in,
        "box_probs": found["probs"],
        "param_change": found["param_change"],
        "editor_requests": found["editor_requests"] + refined.get("editor_requests", 0),
        "denoise_steps": found["denoise_steps"] + refined.get("denoise_steps", 0),
        "config_hash": config.digest(),
        "seed": row_seed(row, config),
        "library_version": library_version(),
    }
    record_kept(store, result)  # before result.json: an item whose result is there has its record
    store.write_json(f"{item}/result.json", result)
    return {"final_path": f"items/{row.id}/final.png", "box": box, "result": result}


KEEP_PREFIX = "keep-"  # in a regions or masks folder: which of its images an item keeps


def _kept_paths(result: dict) -> set[str]:
    """The paths of the candidate images an item keeps (``keep_candidates``)."""
    cands = result["candidates"]
    keep = result.get("keep_candidates", "all")
    return {cands[i]["path"] for i in kept_candidates(keep, len(cands), result["chosen"])}


def record_kept(store: Store, result: dict) -> None:
    """Write, in each of the item's regions and masks folders, which of the folder's candidate
    images the item keeps (``keep-<item key>.json``; ``keep_candidates`` chosen or none), so
    that no other item's pruning deletes them (see :func:`prune_candidates`)."""
    if result.get("keep_candidates", "all") == "all":
        return
    kept = _kept_paths(result)
    for folder in (result.get("regions_path"), result.get("masks_path")):
        if folder:
            mine = sorted(rel for rel in kept if posixpath.dirname(rel) == folder)
            store.write_json(f"{folder}/{KEEP_PREFIX}{result['item_key']}.json", mine)


def prune_candidates(store: Store, result: dict, busy: set[str] | frozenset[str] = frozenset()
                     ) -> None:
    """Delete the candidate images an item does not keep (see ``keep_candidates``) from its
    regions and masks folders, except folders in ``busy`` and images another item keeps. Call
    it only once no row in flight may still read them: a later row that needs them recomputes
    them.

    Items of different settings may share a folder (ablation cells that differ only in the
    selection choose different candidates of one regions result): each item records what it
    keeps there when it is written (:func:`record_kept`), and only images that no item's record
    names are deleted, so no item's kept candidate goes and no item is redone for it."""
    if result.get("keep_candidates", "all") == "all":
        return
    kept = _kept_paths(result)
    for folder in (result.get("regions_path"), result.get("masks_path")):
        if not folder or folder in busy:
            continue
        names = store.listdir(folder)
        wanted = set(kept)
        for name in names:
            if name.startswith(KEEP_PREFIX) and name.endswith(".json"):
                try:
                    wanted.update(store.read_json(f"{folder}/{name}"))
                except (OSError, ValueError):
                    pass  # unreadable: that item's candidates may go (it recomputes them)
        present = [f"{folder}/{name}" for name in names
                   if name.startswith("cand_") and name.endswith(".png")]
        store.remove([rel for rel in present if rel not in wanted])


class OutsideOutputError(ValueError):
    """A result.json refers to a file outside the output folder it was read from (it was read
    from a folder inside another output folder, such as an ablation cell)."""


# Where an item's result.json may refer (besides its own folder): the shared caches.
ITEM_REF_FOLDERS = ("cache/images/", "cache/regions/", "cache/masks/")


def item_files(result: dict, item_id: str, items: str = "items") -> list[str]:
    """Every file the item's ``result.json`` (``result``) names, relative to the output folder:
    its final image, overlay and edit layer, the input and the kept candidates' images and
    masks it refers to. Candidates that ``keep_candidates`` pruned are not named. Raises
    KeyError, TypeError or AttributeError for a ``result`` that is not an item's result,
    ValueError for one that names a file outside the item's folder and the caches, and
    :class:`OutsideOutputError` for one that names a file outside the output folder."""
    refs = [result["input"], result.get("mask"), result.get("layer")]
    refs += [cand.get(key) for cand in result["candidates"] for key in ("image", "mask")]
    own = f"{items}/{item_id}/"
    files = [f"{own}final.png", f"{own}overlay.png"]
    for ref in refs:
        if not ref:
            continue
        rel = resolve_ref(items, item_id, str(ref))
        if rel == ".." or rel.startswith("../"):
            raise OutsideOutputError(f"names {ref!r}, outside the output folder")
        if not rel.endswith(".png") or not rel.startswith((own, *ITEM_REF_FOLDERS)):
            raise ValueError(f"names {ref!r}: not an image of the item's folder or the caches")
        files.append(rel)
    return list(dict.fromkeys(files))


def missing_files(store: Store, rels: list[str]) -> list[str]:
    """The files of ``rels`` that are not there, from metadata only: one request per folder,
    a listing where several files of it are wanted, an existence check where one is (so a
    large shared folder such as ``cache/images/`` is never listed)."""
    by_folder: dict[str, list[str]] = {}
    for rel in rels:
        by_folder.setdefault(posixpath.dirname(rel), []).append(rel)
    missing = []
    for folder, wanted in by_folder.items():
        if len(wanted) == 1:
            missing += [rel for rel in wanted if not store.exists(rel)]
        else:
            names = set(store.listdir(folder))
            missing += [rel for rel in wanted if posixpath.basename(rel) not in names]
    return missing


def finished_item(row: ManifestRow, state: dict, store: Store, items: str = "items") -> dict | None:
    """The stored result of this item if a previous run completed it with the same inputs and
    settings (the item key) and every file its result.json names is still there (see
    :func:`item_files`; checked by name, not decoded), else None: the item is then made again,
    reusing whatever of its stages' cached results is whole."""
    rel = f"{items}/{row.id}/result.json"
    if "item_key" not in state or not store.exists(rel):
        return None
    try:
        result = store.read_json(rel)
        if result.get("item_key") != state["item_key"]:
            return None
        return None if missing_files(store, item_files(result, row.id, items)) else result
    except UNREADABLE:  # unreadable, not an item's result, or a path outside the output folder
        return None


EVAL_SETTINGS = (  # the scorer also decides whether the oracle target is the object mask
    "features", "feature_model", "feature_size", "feature_kwargs", "random_weights", "scorer",
    "clip_model", "clip_pretrained", "clip_kwargs", "work_size", "work_multiple",
)


def object_mask(
    row: ManifestRow, config: Config, store: Store, items: str, result: dict,
    source: Image.Image, target: np.ndarray | None = None,
) -> tuple[np.ndarray | None, str | None]:
    """The edited object's mask at the input's size, and whence: the manifest's ground truth
    (``target``, the row's target_mask as read by :func:`evaluate`), else the oracle world's
    target (the source caption's colour), else the chosen edit's refined mask, else none."""
    if target is not None:
        return target, "target_mask"
    if config.scorer == "oracle":
        oracle = heavy_import("lregions_core.oracle")
        try:
            return oracle.target_mask(source, row.source), "oracle target"
        except ValueError:  # no palette colour in the caption: no ground truth
            pass
    if result.get("mask"):
        mask = store.read_png(resolve_ref(items, row.id, result["mask"]), mode="L")
        full = mask.resize(source.size, Image.Resampling.BILINEAR)
        return np.asarray(full) > 127, "refined mask"
    return None, None


def evaluate(
    row: ManifestRow, state: dict, config: Config, store: Store, evaluator: Callable,
    items: str = "items",
) -> dict:
    """Metrics of a finished item (see :mod:`lregions_core.metrics`), stored beside it and
    reused while the item, its ground truth (target_box, target_mask) and the evaluation models
    are unchanged. The target_mask is the ground truth of the background and object metrics
    where the row has one (its bytes are part of the key); a mask that cannot be read fails the
    evaluation, naming the file."""
    from lregions_core.metrics import load_target_mask

    mask_bytes = read_source(row.target_mask) if row.target_mask else b""
    mask_hash = hashlib.sha256(mask_bytes).hexdigest()[:20] if row.target_mask else None
    rel = f"{items}/{row.id}/metrics.json"
    key = _hash(state["item_key"], config.digest(EVAL_SETTINGS), library_version(), METRICS,
                row.target_box, mask_hash)
    if store.exists(rel):
        try:
            found = store.read_json(rel)
            if found.get("eval_key") == key:
                return {"evaluation": found}
        except (ValueError, OSError):
            pass  # unreadable: recompute
    result = state.get("result") or store.read_json(f"{items}/{row.id}/result.json")
    source = store.read_png(resolve_ref(items, row.id, result["input"]))
    target = (load_target_mask(row.target_mask, source.size, mask_bytes) if row.target_mask
              else None)
    obj, whence = object_mask(row, config, store, items, result, source, target)
    found = evaluator().evaluate(
        source, store.read_png(f"{items}/{row.id}/final.png"),
        prompt=row.prompt, source_prompt=row.source, box=tuple(result["box"]),
        target_box=row.target_box, object_mask=obj, object_from=whence, target_mask=target,
    )
    found = {"eval_key": key, **found}
    store.write_json(rel, found)
    return {"evaluation": found}


def timed(seconds: dict, name: str, fn: Callable, *args) -> Any:
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        seconds[name] = round(time.perf_counter() - start, 4)
