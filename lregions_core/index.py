"""The batch index: one row per manifest row, written part by part as rows finish.

Layout, under the folder that holds ``index.parquet`` (the output folder, or an ablation cell's):

- ``index-parts/run=<run id>/<part>.parquet``: written as soon as a chunk of rows has gone
  through every stage (each row's item is complete by then), so a run killed at any moment
  leaves a readable index of every row it finished. Part names sort in manifest order.
- ``index.parquet``: when a run ends, its parts are merged (streamed, one part in memory at a
  time) into this file, written atomically, and the parts folder is removed.
- ``index-parts/run=<run id>/run.json``: the run's fingerprint (manifest rows, settings, how
  rows are cut into parts). A later run with the same fingerprint *resumes* that run
  (:func:`begin_run`): parts it already wrote are kept and their rows are not processed again,
  except a part with a row that failed for a transient reason (``error_kind`` "transient": a
  network read that failed after every try): ``<part>.retry.json`` beside it says so, and the
  resumed run runs that part's chunk again (its finished rows are reused, not recomputed).
- ``error_kind`` of a failed row: "transient" (tried again by the next run, fresh or resumed)
  or "data" (every other failure: the row's input or its processing; tried again by a fresh run).

:func:`read_index` gives the latest word on every row: ``index.parquet`` overlaid with the rows
of any parts left by runs that did not finish (the newest run wins). Every part has the same
Arrow schema (:data:`SCHEMA`), so parts of any run always merge.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
import time
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lregions_core.config import Config
from lregions_core.metrics import METRICS
from lregions_core.store import Store

PARTS = "index-parts"
INDEX = "index.parquet"
RUN_RECORD = "run.json"
RETRY_SUFFIX = ".retry.json"  # beside a part with transiently failed rows: not done on resume

SCHEMA = pa.schema(
    [
        ("id", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("error_kind", pa.string()),
        ("final_path", pa.string()), ("box", pa.string()), ("shape", pa.string()),
        # what made the final image ("upsample" or "region", see final_render) and its input
        # pixels per editor pixel over the edited region (1.0: at the photo's own resolution)
        ("render", pa.string()), ("edit_scale", pa.float64()),
        ("text_sim", pa.float64()), ("image_sim", pa.float64()), ("loss", pa.float64()),
        ("selection_score", pa.float64()), ("editor_requests", pa.int64()),
        ("reused", pa.bool_()),
        ("seconds_ingest", pa.float64()), ("seconds_features", pa.float64()),
        ("seconds_regions", pa.float64()), ("seconds_masks", pa.float64()),
        ("seconds_outputs", pa.float64()),
        ("seconds_evaluate", pa.float64()),
        ("config_hash", pa.string()), ("seed", pa.int64()), ("image", pa.string()),
        ("prompt", pa.string()), ("source", pa.string()), ("target_box", pa.string()),
        ("row", pa.int64()),
        *[(metric, pa.float64()) for metric in METRICS],
        ("metrics_missing", pa.string()), ("metrics_weights", pa.string()),
        # the manifest's target_mask; which ground truth the bg_* metrics used ("target_mask",
        # "target_box" or null: the chosen box), and whence the object metrics' mask came
        ("target_mask", pa.string()), ("ground_truth", pa.string()), ("object_mask", pa.string()),
    ]
)
INDEX_COLUMNS = SCHEMA.names


def new_run_id() -> str:
    """A run id that sorts by start time (UTC, then random): the newest run's parts win."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _join(folder: str, *parts: str) -> str:
    return posixpath.join(folder, *parts) if folder else posixpath.join(*parts)


def part_path(folder: str, run_id: str, part: str) -> str:
    return _join(folder, PARTS, f"run={run_id}", f"{part}.parquet")


def fingerprint(rows: Iterable[Any], config: Config, **layout: Any) -> str:
    """What makes two runs the same work: the manifest rows (``ManifestRow``), every setting,
    the library version and how rows are cut into parts (``layout``: chunk size, shard size)."""
    from lregions_core.stages import library_version

    digest = hashlib.sha256()
    digest.update(json.dumps([config.digest(), library_version(), layout], sort_keys=True,
                             default=str).encode())
    for row in rows:
        digest.update(json.dumps(row.to_record(), sort_keys=True).encode())
    return digest.hexdigest()[:24]


def begin_run(store: Store, folder: str, fingerprint: str) -> tuple[str, set[str]]:
    """The run to write parts into: the newest unfinished run with this fingerprint (a run that
    was killed, or whose workers were lost), else a new one. Returns its id and the names of
    the parts it has already written whose rows are done (no transient failure among them)."""
    for run_id in reversed(_runs(store, folder)):
        try:
            record = store.read_json(_join(folder, PARTS, f"run={run_id}", RUN_RECORD))
        except (OSError, ValueError):
            continue
        if record.get("fingerprint") == fingerprint:
            return run_id, done_parts(store, folder, run_id)
    run_id = new_run_id()
    store.write_json(_join(folder, PARTS, f"run={run_id}", RUN_RECORD),
                     {"fingerprint": fingerprint, "started": time.time()})
    return run_id, set()


def part_names(store: Store, folder: str, run_id: str) -> set[str]:
    """Names (without ``.parquet``) of the parts ``run_id`` has written so far."""
    return {posixpath.basename(rel).removesuffix(".parquet")
            for rel in _parts(store, folder, run_id)}


def done_parts(store: Store, folder: str, run_id: str) -> set[str]:
    """Names of the parts of ``run_id`` whose rows are done: written, and not marked to be run
    again (a transiently failed row, or a row ``lregions verify --repair`` repaired)."""
    return part_names(store, folder, run_id) - retry_parts(store, folder, run_id)


def retry_parts(store: Store, folder: str, run_id: str) -> set[str]:
    """Names of the parts of ``run_id`` marked to run again: a transiently failed row (see
    :func:`write_part`) or a repaired one (:func:`redo_rows`)."""
    return {name.removesuffix(RETRY_SUFFIX)
            for name in store.listdir(_join(folder, PARTS, f"run={run_id}"))
            if name.endswith(RETRY_SUFFIX)}


def part_counts(store: Store, folder: str, run_id: str, part: str) -> dict[str, int]:
    """rows, ok, failed and reused of one written part."""
    table = _read(store, part_path(folder, run_id, part)).select(["status", "reused"])
    status, reused = table.column("status").to_pylist(), table.column("reused").to_pylist()
    ok = sum(s == "ok" for s in status)
    return {"rows": len(status), "ok": ok, "failed": len(status) - ok,
            "reused": sum(bool(r) for r in reused)}


def index_row(state: dict, config: Config) -> dict[str, Any]:
    """The index record of one row's final state (what the index needs, nothing more)."""
    row = state["row"]
    result = state.get("result") or {}
    scores = result.get("scores") or {}
    chosen = result.get("chosen")
    selection = result.get("selection") or []
    seconds = state.get("seconds", {})
    evaluation = state.get("evaluation") or {}
    metrics = evaluation.get("metrics") or {}
    missing = dict(evaluation.get("missing") or {})
    if state.get("evaluation_error"):
        missing = {m: state["evaluation_error"] for m in METRICS}
    box = state.get("box")
    target = row.get("target_box")
    ok = state["status"] == "ok"
    return {
        "id": row["id"],
        "status": "ok" if ok else "error",
        "error": state.get("error"),
        "error_kind": None if ok else state.get("error_kind") or "data",
        "final_path": state.get("final_path"),
        "box": ",".join(str(v) for v in box) if box else None,
        "shape": result.get("shape"),
        "render": result.get("render"),
        "edit_scale": _number(result.get("edit_scale")),
        "text_sim": scores.get("text_sim"),
        "image_sim": scores.get("image_sim"),
        "loss": result.get("loss"),
        "selection_score": selection[chosen] if chosen is not None else None,
        "editor_requests": result.get("editor_requests"),
        "reused": bool(state.get("reused")),
        "seconds_ingest": seconds.get("ingest"),
        "seconds_features": seconds.get("features"),
        "seconds_regions": seconds.get("regions"),
        "seconds_masks": seconds.get("masks"),
        "seconds_outputs": seconds.get("select+outputs"),
        "seconds_evaluate": seconds.get("evaluate"),
        "config_hash": config.digest(),
        "seed": row["seed"] if row.get("seed") is not None else config.seed,
        "image": row["image"],
        "prompt": row["prompt"],
        "source": row.get("source"),
        "target_box": ",".join(str(v) for v in target) if target else None,
        "row": row["row"],
        **{m: _number(metrics.get(m)) for m in METRICS},
        "metrics_missing": json.dumps(missing) if ok else None,
        "metrics_weights": evaluation.get("weights"),
        "target_mask": row.get("target_mask"),
        "ground_truth": evaluation.get("ground_truth"),
        "object_mask": evaluation.get("object_mask"),
    }


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def table(states: list[dict], config: Config) -> pa.Table:
    return pa.Table.from_pylist([index_row(s, config) for s in states], schema=SCHEMA)


def write_part(store: Store, folder: str, run_id: str, part: str, states: list[dict],
               config: Config) -> None:
    """Write the index rows of ``states`` (rows that have been through every stage). When a row
    failed for a transient reason, ``<part>.retry.json`` (its ids) is written first, so a
    resumed run never takes such a part for done; a part written again without one removes it.
    """
    rows = table(states, config)
    retry = _join(folder, PARTS, f"run={run_id}", part + RETRY_SUFFIX)
    transient = [i for i, kind in zip(rows.column("id").to_pylist(),
                                      rows.column("error_kind").to_pylist()) if kind == "transient"]
    if transient:
        store.write_json(retry, {"transient": transient})
    buffer = pa.BufferOutputStream()
    pq.write_table(rows, buffer)
    store.write_bytes(part_path(folder, run_id, part), buffer.getvalue().to_pybytes())
    if not transient:
        store.remove([retry])  # one left by an earlier write of this part, if any


def redo_rows(store: Store, folder: str, ids: Iterable[str], why: str) -> list[str]:
    """Make a resumed run redo the rows ``ids``: every part of an unfinished run that holds one
    gets a ``<part>.retry.json`` (``why``, and those ids), so :func:`begin_run` does not count
    it as done (the part's other rows are reused when it runs again). Returns the markers
    written."""
    wanted, written = set(ids), []
    for run_id in _runs(store, folder):
        for rel in _parts(store, folder, run_id):
            found = wanted.intersection(_read(store, rel).column("id").to_pylist())
            if found:
                marker = rel.removesuffix(".parquet") + RETRY_SUFFIX
                store.write_json(marker, {why: sorted(found)})
                written.append(marker)
    return written


def _runs(store: Store, folder: str) -> list[str]:
    """Run ids with parts under ``folder``, oldest first."""
    return [name.removeprefix("run=") for name in store.listdir(_join(folder, PARTS))
            if name.startswith("run=")]


def _parts(store: Store, folder: str, run_id: str) -> list[str]:
    run = _join(folder, PARTS, f"run={run_id}")
    return [f"{run}/{name}" for name in store.listdir(run)
            if name.endswith(".parquet") and not name.startswith(".")]


def _read(store: Store, rel: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(store.read_bytes(rel)), schema=SCHEMA)


def read_index(store: Store, folder: str = ""):
    """Every row's latest index record as a pandas DataFrame (manifest order): the last merged
    ``index.parquet`` overlaid with the parts of unfinished runs, newest run first. Readable at
    any moment, also while a run is writing parts. Raises FileNotFoundError when there is
    neither an index nor any part."""
    tables = []
    for run_id in reversed(_runs(store, folder)):
        tables += [_read(store, rel) for rel in _parts(store, folder, run_id)]
    if store.exists(_join(folder, INDEX)):
        tables.append(_read(store, _join(folder, INDEX)))
    if not tables:
        raise FileNotFoundError(f"no {INDEX} and no index parts in {store.url_of(folder)}")
    frame = pa.concat_tables(tables).to_pandas()
    frame = frame.drop_duplicates("id", keep="first")  # newest run first
    return frame.sort_values("row", kind="stable").reset_index(drop=True)


def merge(store: Store, folder: str, run_id: str) -> int:
    """Stream the parts of ``run_id`` (in part-name order) into ``<folder>/index.parquet``, then
    remove every run's parts (older runs' rows are all in this run's parts). Returns the number
    of rows written."""
    rows = 0
    with store.open_write(_join(folder, INDEX)) as handle, pq.ParquetWriter(
        handle, SCHEMA
    ) as writer:
        for rel in _parts(store, folder, run_id):
            part = _read(store, rel)
            writer.write_table(part)
            rows += part.num_rows
        if rows == 0:
            writer.write_table(SCHEMA.empty_table())
    store.remove_tree(_join(folder, PARTS))
    # A merge killed half-way leaves its temporary file beside the index: gone now.
    stale = [_join(folder, name) for name in store.listdir(folder)
             if name.startswith(f".{INDEX}.") and name.endswith(".tmp")]
    store.remove(stale)
    return rows
