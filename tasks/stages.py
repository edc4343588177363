"""The batch stages as Prefect tasks, each over a chunk of rows: a thin wrapper around one
:mod:`lregions_core.batch` call (where the per-row failure isolation lives).

Why chunks: one task run per row and stage would put thousands of tiny runs on the server for a
large manifest; a chunk keeps Prefect's view coarse while a failing row only marks itself failed.

Why no Prefect result cache: each stage stores its results itself at an address keyed on content
hashes, the settings that stage reads and the library version (see
:mod:`lregions_core.stages`), and finds them again on a rerun. Prefect's own cache would need
its results persisted (pickled by default) and would only duplicate that.

Arguments are plain JSON-ready values (row states, the settings as a dict, the output folder),
so a task run's inputs never hold pixels or models.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from lregions_core import batch
from lregions_core.config import Config
from lregions_core.store import Store


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_chunk(states: list[dict], config: dict, out: str, items: str) -> list[dict]:
    """Hash and normalise images; plan every stage's key; spot items a previous run finished."""
    return batch.ingest_rows(states, Config(**config), Store(out), items)


@task(name="features", cache_policy=NO_CACHE)
def features_chunk(states: list[dict], config: dict, out: str, items: str) -> list[dict]:
    """DINO features (cached per image and feature model)."""
    return batch.features_rows(states, Config(**config), Store(out), items)


@task(name="regions", cache_policy=NO_CACHE, tags=["gpu"])
def regions_chunk(states: list[dict], config: dict, out: str, items: str) -> list[dict]:
    """The GPU stage: anchors, proposals and region learning."""
    return batch.regions_rows(states, Config(**config), Store(out), items)


@task(name="outputs", cache_policy=NO_CACHE)
def outputs_chunk(states: list[dict], config: dict, out: str, items: str) -> list[dict]:
    """Select the final edit and write each item's files."""
    return batch.outputs_rows(states, Config(**config), Store(out), items)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_chunk(states: list[dict], config: dict, out: str, items: str) -> list[dict]:
    """Metrics of every finished item; a failing metric fails only its row's metric."""
    return batch.evaluate_rows(states, Config(**config), Store(out), items)


# Stage name -> task, in the order of lregions_core.batch.STAGES.
STAGE_TASKS = {
    "ingest": ingest_chunk,
    "features": features_chunk,
    "regions": regions_chunk,
    "outputs": outputs_chunk,
    "evaluate": evaluate_chunk,
}
assert list(STAGE_TASKS) == list(batch.STAGES), "tasks and library stages out of step"
