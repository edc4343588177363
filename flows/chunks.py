"""Chunks of manifest rows through the stage tasks, in a bounded window, inside a flow run.

Why a window: memory must not grow with the manifest. At most ``window`` chunks are in flight;
when a chunk has been through every stage its index part is written
(:mod:`lregions_core.index`), its candidate images are pruned as ``keep_candidates`` says, its
row states are dropped (only counters remain) and the next chunk is admitted.

Why stage by stage: a task is submitted only when its input is ready (the previous stage of its
chunk has finished), so no worker thread sits waiting on another future, and the GPU stage is
held to ``gpu_slots`` chunks at a time per process while ingest, features and outputs of other
chunks go on beside it. Stages with nothing to do for a chunk (every row reused or failed) are
skipped, so a rerun that reuses everything costs one ingest task per chunk; and a chunk whose
part a resumed run had already written (``done_parts``: see
:func:`lregions_core.index.done_parts`, which leaves out parts marked to run again) is not run
at all.
"""

from __future__ import annotations

import queue
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from prefect.logging import get_run_logger

from lregions_core import index, stages
from lregions_core.batch import new_state
from lregions_core.config import Config
from lregions_core.manifest import ManifestRow
from lregions_core.store import Store
from tasks.stages import STAGE_TASKS

WINDOW = 8  # chunks in flight per flow run: enough to keep 4 task threads busy
STALL_LOG_SECONDS = 300  # say what the run is waiting for when nothing finishes this long


def _needed(name: str, states: list[dict]) -> bool:
    """Whether stage ``name`` has any row to work on."""
    wanted = "ok" if name == "evaluate" else "pending"
    return any(s["status"] == wanted for s in states)


class _Chunks:
    """The bookkeeping of one :func:`run_chunks` call (single-threaded: only the flow's own
    thread touches it; task threads only put finished futures on ``done``)."""

    def __init__(self, stage_names: list[str], gpu_slots: int) -> None:
        self.names = stage_names
        self.done: queue.Queue = queue.Queue()
        self.running: dict[Any, tuple[int, int]] = {}  # future -> (chunk, stage position)
        self.in_flight: dict[int, list[dict]] = {}  # chunk -> its row states
        self.gpu_waiting: deque[tuple[int, int]] = deque()
        self.gpu_free = gpu_slots


def run_chunks(
    rows: list[ManifestRow],
    config: Config,
    out: str,
    *,
    run_id: str,
    folder: str = "",
    items: str = "items",
    part_prefix: str = "",
    chunk_size: int = 8,
    evaluate: bool = True,
    window: int = WINDOW,
    gpu_slots: int = 1,
    done_parts: set[str] | frozenset[str] = frozenset(),
    on_rows: Callable[[int], None] | None = None,
) -> Counter:
    """Every stage over ``rows`` in chunks of ``chunk_size``; each finished chunk's index part
    goes to ``<folder>/index-parts/run=<run_id>/<part_prefix><chunk>.parquet``, and chunks
    whose part is in ``done_parts`` are skipped. ``on_rows(n)`` is called as rows finish (ok
    or failed). Returns counts: rows, ok, failed, reused.
    """
    store, settings = Store(out), config.to_dict()
    names = [n for n in STAGE_TASKS if evaluate or n != "evaluate"]
    book = _Chunks(names, gpu_slots)
    starts = iter(range(0, len(rows), chunk_size))
    counts: Counter = Counter()

    def submit(chunk: int, position: int) -> None:
        states = book.in_flight[chunk]
        while position < len(names) and not _needed(names[position], states):
            position += 1  # nothing for this stage to do (all reused or failed)
        if position == len(names):
            finish(chunk)
            return
        name = names[position]
        if name == "regions":
            if book.gpu_free == 0:
                book.gpu_waiting.append((chunk, position))
                return
            book.gpu_free -= 1
        future = STAGE_TASKS[name].submit(states, settings, out, items)
        book.running[future] = (chunk, position)
        future.add_done_callback(book.done.put)

    def finish(chunk: int) -> None:
        states = book.in_flight.pop(chunk)
        report(states)
        index.write_part(store, folder, run_id, f"{part_prefix}{chunk:06d}", states, config)
        # Another chunk in flight may share a regions result (same image, prompt and seed):
        # leave its candidates until that chunk is done too. (A chunk not yet ingested that
        # shares one finds it pruned and recomputes it: see stages.regions.)
        busy = {folder for other in book.in_flight.values() for s in other
                if "regions_key" in s
                for folder in (stages.regions_folder(s), stages.masks_folder(s)) if folder}
        for state in states:
            result = state.get("result")
            if state["status"] == "ok" and result:
                stages.prune_candidates(store, result, busy)
        counts.update(rows=len(states), ok=sum(s["status"] == "ok" for s in states),
                      failed=sum(s["status"] != "ok" for s in states),
                      reused=sum(bool(s.get("reused")) for s in states))

    def report(states: list[dict]) -> None:
        finished = [s for s in states if s["status"] != "pending" and not s.get("reported")]
        for state in finished:
            state["reported"] = True
        if finished and on_rows is not None:
            on_rows(len(finished))

    def admit() -> None:
        while len(book.in_flight) < window:
            start = next(starts, None)
            if start is None:
                return
            chunk = start // chunk_size
            part = f"{part_prefix}{chunk:06d}"
            if part in done_parts:  # written by the run this one resumes
                done = index.part_counts(store, folder, run_id, part)
                counts.update(done)
                if on_rows is not None:
                    on_rows(done["rows"])
                continue
            book.in_flight[chunk] = [new_state(row) for row in rows[start : start + chunk_size]]
            submit(chunk, 0)

    admit()
    waited = time.monotonic()
    while book.running:
        try:
            future = book.done.get(timeout=STALL_LOG_SECONDS)
        except queue.Empty:
            stuck = sorted((c, names[p]) for c, p in book.running.values())
            get_run_logger().warning("no stage finished for %.0f s; waiting on (chunk, stage) %s",
                        time.monotonic() - waited, stuck)
            continue
        waited = time.monotonic()
        chunk, position = book.running.pop(future)
        name = names[position]
        try:
            book.in_flight[chunk] = future.result()
        except Exception as exc:  # noqa: BLE001 - the task itself failed: fail its pending rows
            for state in book.in_flight[chunk]:
                if state["status"] == "pending":
                    state.update(status="error", error=f"{name}: task failed: {exc}")
                elif name == "evaluate" and state["status"] == "ok":
                    state["evaluation_error"] = f"evaluate: task failed: {exc}"
        report(book.in_flight[chunk])
        if name == "regions":
            book.gpu_free += 1
            if book.gpu_waiting:
                submit(*book.gpu_waiting.popleft())
        submit(chunk, position + 1)
        admit()
    return counts
