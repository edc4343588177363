"""The stages over a chunk of manifest rows: each stage runs on every row still pending, and a row
that fails is marked failed with its message while the others go on.

A row's *state* is a small JSON-ready dict that travels from stage to stage: the manifest row,
``status`` ("pending", "ok" or "error"), ``error``, seconds per stage, and each stage's small
outputs (hashes, cache paths, the chosen candidate, the item's result, its metrics). Pixels never
travel in it: stages write them to the :class:`~lregions_core.store.Store` and pass paths.

Every ``*_rows`` function has the signature ``(states, config, store, items) -> states`` so an
orchestrator can chain them (see :data:`STAGES`); the batch application wraps each one in a
Prefect task. Models are loaded lazily, once per process and settings
(:func:`~lregions_core.pipeline.shared_models`): a rerun that reuses everything loads none.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

from lregions_core import stages
from lregions_core.config import Config
from lregions_core.manifest import ManifestRow
from lregions_core.metrics import shared_evaluator
from lregions_core.pipeline import shared_models
from lregions_core.remote import error_kind
from lregions_core.store import Store

Work = Callable[[ManifestRow, dict], "dict | None"]


def new_state(row: ManifestRow) -> dict:
    """The state of a manifest row before any stage (a row the manifest check failed is done)."""
    return {"row": row.to_record(), "status": "pending" if row.error is None else "error",
            "error": row.error, "seconds": {}, "reused": False}


def row_of(state: dict) -> ManifestRow:
    return ManifestRow.from_record(state["row"])


def run_stage(states: list[dict], stage: str, work: Work) -> list[dict]:
    """Run ``work`` on every pending row; a failure marks only that row, with its message and
    its kind (:func:`~lregions_core.remote.error_kind`: "transient" or "data")."""
    for state in states:
        if state["status"] != "pending":
            continue
        try:
            with_time: dict[str, float] = {}  # recorded only when the stage succeeds
            update = stages.timed(with_time, stage, work, row_of(state), state)
            state["seconds"].update(with_time)
            if update:
                state.update(update)
        except Exception as exc:  # noqa: BLE001 - one bad row must not sink the chunk
            state["status"] = "error"
            state["error"] = f"{stage}: {exc}"
            state["error_kind"] = error_kind(exc)  # "transient": the next run tries it again
            state["traceback"] = traceback.format_exc(limit=3)
    return states


def ingest_rows(states: list[dict], config: Config, store: Store, items: str) -> list[dict]:
    """Hash and normalise images; plan every stage's key; spot items a previous run finished."""

    def work(row: ManifestRow, state: dict) -> dict:
        found = stages.ingest(row, store)
        found.update(stages.plan(row, found["image_hash"], config))
        done = stages.finished_item(row, found, store, items)
        if done is not None:
            found.update(status="ok", reused=True, final_path=f"items/{row.id}/final.png",
                         box=done["box"], result=done)
        return found

    return run_stage(states, "ingest", work)


def features_rows(states: list[dict], config: Config, store: Store, items: str) -> list[dict]:
    """DINO features of every pending row's working image (cached per image and model)."""
    models = lambda: shared_models(config)
    return run_stage(states, "features",
                     lambda row, state: stages.features(state, config, store, models))


def regions_rows(states: list[dict], config: Config, store: Store, items: str) -> list[dict]:
    """Anchors, proposals and region learning, then (region_shape mask/auto) the object masks
    inside the boxes and their edits: the GPU stage, both cached stages of their own."""
    models = lambda: shared_models(config)
    states = run_stage(states, "regions",
                       lambda row, state: stages.regions(row, state, config, store, models))
    return run_stage(states, "masks",
                     lambda row, state: stages.masks(row, state, config, store, models))


def outputs_rows(states: list[dict], config: Config, store: Store, items: str) -> list[dict]:
    """Select the final edit and write each item's files (a ``final_render`` "region" render
    edits the chosen region again, on the process's shared models)."""

    def work(row: ManifestRow, state: dict) -> dict:
        state.update(stages.select(state, config, store))
        written = stages.outputs(row, state, config, store, items)
        return {**written, "status": "ok", "reused": False}

    return run_stage(states, "select+outputs", work)


def evaluate_rows(states: list[dict], config: Config, store: Store, items: str) -> list[dict]:
    """Metrics of every finished item (reused or new). A failing metric keeps the edit: it is
    reported as missing with its reason, and the row stays ok."""
    evaluator = lambda: shared_evaluator(config)
    for state in states:
        if state["status"] != "ok":
            continue
        try:
            update = stages.timed(state["seconds"], "evaluate", stages.evaluate, row_of(state),
                                  state, config, store, evaluator, items)
            state.update(update)
        except Exception as exc:  # noqa: BLE001
            state["evaluation_error"] = f"evaluate: {exc}"
    return states


StageRows = Callable[[list[dict], Config, Store, str], list[dict]]
# The stages in order, by name; ``regions`` is the one that needs the GPU.
STAGES: dict[str, StageRows] = {
    "ingest": ingest_rows,
    "features": features_rows,
    "regions": regions_rows,
    "outputs": outputs_rows,
    "evaluate": evaluate_rows,
}


def run_all(states: list[dict], config: Config, store: Store, items: str = "items", *,
            evaluate: bool = True) -> list[dict]:
    """Every stage over one chunk, in order, in this thread (no orchestrator needed)."""
    for name, rows in STAGES.items():
        if name != "evaluate" or evaluate:
            states = rows(states, config, store, items)
    return states
