"""The method split into cacheable stages for batch runs: ingest, features, regions, select,
outputs. Each stage stores its large results itself (PNG, JSON, Parquet) at an address made of
content hashes, the settings that stage reads (:data:`STAGE_SETTINGS`) and the library version,
so a finished stage is found again after a restart and a changed setting recomputes only the
stages that read it. Stages pass small JSON-ready dicts between them.
"""

from __future__ import annotations

import hashlib
import json
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
    input_box,
    load_image,
    paste_back,
    paste_region,
    read_source,
    to_working,
)
from lregions_core.interfaces import CandidateScores, Features
from lregions_core.manifest import ManifestRow
from lregions_core.store import Store

FEATURE_SETTINGS = (
    "features", "feature_model", "feature_size", "feature_kwargs", "random_weights",
    "work_size", "work_multiple",
)
REGION_SETTINGS = FEATURE_SETTINGS + (
    "scorer", "clip_model", "clip_pretrained", "clip_kwargs", "clip_views",
    "clip_structure_layer", "editor", "editor_model", "editor_steps", "guidance_scale",
    "prompt_template", "editor_kwargs", "num_anchors", "anchor_rule", "anchor_spread",
    "num_proposals", "proposal_min", "proposal_max", "mode", "roi_size", "rgn_hidden",
    "iterations", "lr", "tau", "estimator", "w_clip", "w_dir", "w_str",
)
SELECT_SETTINGS = ("select_text_weight", "select_image_weight", "select_top_k")
OUTPUT_SETTINGS = ("feather",)
# Settings that change where or how fast work runs, not its result.
OPERATIONAL_SETTINGS = ("device", "dtype", "weights_dir", "edit_batch", "seed")
STAGE_SETTINGS = {
    "features": FEATURE_SETTINGS,
    "regions": REGION_SETTINGS,
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
    regions_key = stage_key("regions", config, features_key, row.prompt, row.source,
                            row_seed(row, config))
    return {
        "features_key": features_key,
        "regions_key": regions_key,
        "item_key": _hash(regions_key, config.digest(SELECT_SETTINGS + OUTPUT_SETTINGS),
                          library_version()),
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


# -- features -----------------------------------------------------------------------------------
def features(state: dict, config: Config, store: Store, models: Callable) -> dict:
    """DINO attention and patch features of the working image, one Parquet file per image and
    feature model."""
    key = state["features_key"]
    rel = f"cache/features/{state['image_hash']}-{key}.parquet"
    if not store.exists(rel):
        import pandas as pd

        work = to_working(store.read_png(state["image_path"]), config.work_size,
                          config.work_multiple)
        feats = models().features(work)
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
    return {"features_path": rel}


def load_features(store: Store, rel: str) -> Features:
    row = store.read_parquet(rel).iloc[0]
    gh, gw, c = int(row["grid_h"]), int(row["grid_w"]), int(row["channels"])
    return Features(
        attention=np.asarray(row["attention"], np.float32).reshape(gh, gw),
        patches=np.asarray(row["patches"], np.float32).reshape(c, gh, gw),
    )


# -- regions (the GPU stage) --------------------------------------------------------------------
def regions(
    row: ManifestRow, state: dict, config: Config, store: Store, models: Callable
) -> dict:
    """Anchors, proposals and region choice; every candidate's pixels and scores are stored."""
    seed = row_seed(row, config)
    key = state["regions_key"]
    folder = f"cache/regions/{state['image_hash']}-{key}"
    if store.exists(f"{folder}/candidates.json"):  # written last: its presence means complete
        return {"regions_path": folder}
    loaded = models()
    work = to_working(store.read_png(state["image_path"]), config.work_size, config.work_multiple)
    feats = load_features(store, state["features_path"])
    proposals, outcome, bank = pipeline.find_regions(
        config, loaded, work, feats, row.prompt, row.source, seed
    )
    records = []
    for i, cand in enumerate(outcome.candidates):
        store.write_png(f"{folder}/cand_{i:02d}.png", cand.image)
        records.append({"anchor": cand.anchor, "proposal": cand.proposal, "box": cand.box,
                        "loss": cand.loss, "scores": vars(cand.scores)})
    store.write_json(
        f"{folder}/candidates.json",
        {
            "candidates": records,
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


# -- selection and outputs ----------------------------------------------------------------------
def select(state: dict, config: Config, store: Store) -> dict:
    found = store.read_json(f"{state['regions_path']}/candidates.json")
    scores = [CandidateScores(**c["scores"]) for c in found["candidates"]]
    best, selection = pipeline.select(config, scores)
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


def outputs(
    row: ManifestRow, state: dict, config: Config, store: Store, items: str = "items"
) -> dict:
    """``<items>/<id>/``: input, overlay, candidates, final image, then result.json (last, so its
    presence means the item is complete). ``final_path`` is relative to the folder holding
    ``items`` (where that run's index.parquet goes)."""
    item = f"{items}/{row.id}"
    found = store.read_json(f"{state['regions_path']}/candidates.json")
    source = store.read_png(state["image_path"])
    work_size = tuple(found["work_size"])
    chosen = state["chosen"]
    cands = found["candidates"]
    box_work = cands[chosen]["box"]
    edited = store.read_png(f"{state['regions_path']}/cand_{chosen:02d}.png")
    final = paste_back(source, edited, box_work, work_size, config.feather)
    to_input = [source.width / work_size[0], source.height / work_size[1]] * 2
    boxes_in = [[v * s for v, s in zip(c["box"], to_input)] for c in cands]
    anchors_in = np.asarray(found["anchors"]) * np.asarray(to_input[:2])
    store.write_png(f"{item}/input.png", source)
    store.write_png(f"{item}/overlay.png", overlay(source, anchors_in, boxes_in, chosen))
    for i in range(len(cands)):
        store.write_bytes(f"{item}/candidates/{i:02d}.png",
                          store.read_bytes(f"{state['regions_path']}/cand_{i:02d}.png"))
    store.write_png(f"{item}/final.png", final)
    box = list(input_box(source.size, box_work, work_size) or (0, 0, 0, 0))
    result = {
        "id": row.id,
        "item_key": state["item_key"],
        "manifest_row": row.to_record(),
        "box": box,
        "changed_region": list(paste_region(source.size, box_work, work_size, config.feather)),
        "chosen": chosen,
        "scores": cands[chosen]["scores"],
        "loss": cands[chosen]["loss"],
        "selection": state["selection"],
        "candidates": [{**c, "box_input": b} for c, b in zip(cands, boxes_in)],
        "anchors": anchors_in,
        "box_probs": found["probs"],
        "param_change": found["param_change"],
        "editor_requests": found["editor_requests"],
        "denoise_steps": found["denoise_steps"],
        "config_hash": config.digest(),
        "seed": row_seed(row, config),
        "library_version": library_version(),
    }
    store.write_json(f"{item}/result.json", result)
    return {"final_path": f"items/{row.id}/final.png", "box": box, "result": result}


def finished_item(row: ManifestRow, state: dict, store: Store, items: str = "items") -> dict | None:
    """The stored result of this item if a previous run completed it with the same inputs and
    settings (the item key), else None."""
    rel = f"{items}/{row.id}/result.json"
    if "item_key" not in state or not store.exists(rel):
        return None
    try:
        result = store.read_json(rel)
    except (ValueError, OSError):
        return None
    return result if result.get("item_key") == state["item_key"] else None


EVAL_SETTINGS = (
    "features", "feature_model", "feature_size", "feature_kwargs", "random_weights", "scorer",
    "clip_model", "clip_pretrained", "clip_kwargs", "work_size", "work_multiple",
)


def evaluate(
    row: ManifestRow, state: dict, config: Config, store: Store, evaluator: Callable,
    items: str = "items",
) -> dict:
    """Metrics of a finished item (see :mod:`lregions_core.metrics`), stored beside it and
    reused while the item and the evaluation models are unchanged."""
    rel = f"{items}/{row.id}/metrics.json"
    key = _hash(state["item_key"], config.digest(EVAL_SETTINGS), library_version())
    if store.exists(rel):
        try:
            found = store.read_json(rel)
            if found.get("eval_key") == key:
                return {"evaluation": found}
        except (ValueError, OSError):
            pass  # unreadable: recompute
    result = state.get("result") or store.read_json(f"{items}/{row.id}/result.json")
    found = evaluator().evaluate(
        store.read_png(f"{items}/{row.id}/input.png"),
        store.read_png(f"{items}/{row.id}/final.png"),
        prompt=row.prompt, source_prompt=row.source, box=tuple(result["box"]),
        target_box=row.target_box,
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
