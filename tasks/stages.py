"""The batch stages as Prefect tasks over chunks of rows.

Why chunks: one task run per row and stage would put thousands of tiny runs on the server for a
large manifest; a chunk keeps Prefect's view coarse while a failing row only marks itself failed.

Why no Prefect result cache: each stage stores its results itself at an address keyed on content
hashes, the settings that stage reads and the library version (see
:mod:`lregions_core.stages`), and finds them again on a rerun. Prefect's own cache would need
its results persisted (pickled by default) and would only duplicate that.
"""

from __future__ import annotations

import functools
import json
import threading
import traceback
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from lregions_core import stages
from lregions_core.config import Config
from lregions_core.manifest import ManifestRow
from lregions_core.models.weights import WeightsUnavailableError
from lregions_core.pipeline import Models
from lregions_core.store import Store

GPU_SLOTS = threading.BoundedSemaphore(1)  # one region-learning chunk at a time per process
PROGRESS: list[Callable[[dict], None]] = []  # called once per finished row (the CLI's bar)


@functools.lru_cache(maxsize=2)
def _load_models(config_json: str) -> Models | WeightsUnavailableError:
    # Missing weights are remembered too: otherwise every row of a large batch would retry
    # the hub (tens of seconds each offline) only to fail the same way.
    try:
        return Models.load(Config(**json.loads(config_json)))
    except WeightsUnavailableError as exc:
        return exc


def _models(config_json: str) -> Models:
    loaded = _load_models(config_json)
    if isinstance(loaded, WeightsUnavailableError):
        raise loaded
    return loaded


def _config(config: dict) -> Config:
    return Config(**config)


def _models_for(config: dict) -> Callable[[], Models]:
    """Models load lazily (a rerun that reuses everything never loads them) and once per
    process."""
    return lambda: _models(json.dumps(config, sort_keys=True))


def _row(state: dict) -> ManifestRow:
    record = dict(state["row"])
    if record.get("target_box") is not None:
        record["target_box"] = tuple(record["target_box"])
    return ManifestRow(**record)


def _each(states: list[dict], stage: str, work: Callable[[ManifestRow, dict], dict | None]):
    """Run ``work`` on every live row; a failure marks only that row, with its message."""
    for state in states:
        if state["status"] != "pending":
            continue
        try:
            with_time = {}  # recorded only when the stage succeeds
            update = stages.timed(with_time, stage, work, _row(state), state)
            state["seconds"].update(with_time)
            if update:
                state.update(update)
        except Exception as exc:  # noqa: BLE001 - one bad row must not sink the chunk
            state["status"] = "error"
            state["error"] = f"{stage}: {exc}"
            state["traceback"] = traceback.format_exc(limit=3)
    return states


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_chunk(states: list[dict], config: dict, out: str, items: str = "items") -> list[dict]:
    """Hash and normalise images; plan every stage's key; spot items a previous run finished."""
    store, cfg = Store(out), _config(config)

    def work(row: ManifestRow, state: dict) -> dict:
        found = stages.ingest(row, store)
        found.update(stages.plan(row, found["image_hash"], cfg))
        done = stages.finished_item(row, found, store, items)
        if done is not None:
            found.update(status="ok", reused=True, final_path=f"items/{row.id}/final.png",
                         box=done["box"], result=done)
        return found

    return _report(_each(states, "ingest", work))


@task(name="features", cache_policy=NO_CACHE)
def features_chunk(states: list[dict], config: dict, out: str) -> list[dict]:
    store, cfg, models = Store(out), _config(config), _models_for(config)
    return _each(states, "features",
                 lambda row, st: stages.features(st, cfg, store, models))


@task(name="regions", cache_policy=NO_CACHE, tags=["gpu"])
def regions_chunk(states: list[dict], config: dict, out: str) -> list[dict]:
    """The GPU stage: bounded to one chunk at a time per process."""
    store, cfg, models = Store(out), _config(config), _models_for(config)
    with GPU_SLOTS:
        return _each(states, "regions",
                     lambda row, st: stages.regions(row, st, cfg, store, models))


@task(name="outputs", cache_policy=NO_CACHE)
def outputs_chunk(states: list[dict], config: dict, out: str, items: str = "items") -> list[dict]:
    """Select the final edit and write each item's files as soon as that item is done."""
    store, cfg = Store(out), _config(config)

    def work(row: ManifestRow, state: dict) -> dict:
        state.update(stages.select(state, cfg, store))
        written = stages.outputs(row, state, cfg, store, items)
        return {**written, "status": "ok", "reused": False}

    return _report(_each(states, "select+outputs", work))


@functools.lru_cache(maxsize=2)
def _evaluator(config_json: str):
    from lregions_core.metrics import Evaluator

    return Evaluator(Config(**json.loads(config_json)))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_chunk(states: list[dict], config: dict, out: str, items: str = "items") -> list[dict]:
    """Metrics of every finished item (reused or new); a failing metric fails only its row."""
    store, cfg = Store(out), _config(config)
    evaluator = functools.partial(_evaluator, json.dumps(config, sort_keys=True))
    for state in states:
        if state["status"] != "ok":
            continue
        try:
            state.update(stages.evaluate(_row(state), state, cfg, store, evaluator, items))
        except Exception as exc:  # noqa: BLE001 - keep the edit; report the metric failure
            state["evaluation_error"] = f"evaluate: {exc}"
    return states


def _report(states: list[dict]) -> list[dict]:
    for state in states:
        if state["status"] != "pending" and not state.get("reported"):
            state["reported"] = True
            for callback in PROGRESS:
                callback(state)
    return states
