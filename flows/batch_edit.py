"""Batch edit: a CSV manifest of image/prompt rows in, ``OUT/items/<id>/`` and
``OUT/index.parquet`` out. Reads top to bottom like the method's stages."""

from __future__ import annotations

import json
import time

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from lregions_core.config import Config, make_config
from lregions_core.manifest import ManifestRow, read_manifest
from lregions_core.metrics import METRICS
from lregions_core.store import Store
from tasks.stages import (
    evaluate_chunk,
    features_chunk,
    ingest_chunk,
    outputs_chunk,
    regions_chunk,
)

INDEX_COLUMNS = [
    "id", "status", "error", "final_path", "box", "text_sim", "image_sim", "loss",
    "selection_score", "editor_requests", "reused", "seconds_ingest", "seconds_features",
    "seconds_regions", "seconds_outputs", "config_hash", "seed", "image", "prompt", "source",
    "target_box", "row", *METRICS, "metrics_missing", "metrics_weights",
]


def run_stages(
    rows: list[ManifestRow], config: Config, out: str, *, items: str = "items",
    chunk_size: int = 8, evaluate: bool = True,
) -> list[dict]:
    """Every stage over ``rows`` in chunks; returns one state record per row, in order."""
    settings = config.to_dict()
    states = [
        {"row": row.to_record(), "status": "pending" if row.error is None else "error",
         "error": row.error, "seconds": {}, "reused": False}
        for row in rows
    ]
    finished = []
    for start in range(0, len(states), chunk_size):
        chunk = states[start : start + chunk_size]
        ingested = ingest_chunk.submit(chunk, settings, out, items)
        featured = features_chunk.submit(ingested, settings, out)
        regioned = regions_chunk.submit(featured, settings, out)
        done = outputs_chunk.submit(regioned, settings, out, items)
        if evaluate:
            done = evaluate_chunk.submit(done, settings, out, items)
        finished.append(done)
    return [state for future in finished for state in future.result()]


def summarise(states: list[dict], started: float) -> dict:
    return {
        "rows": len(states),
        "ok": sum(s["status"] == "ok" for s in states),
        "failed": sum(s["status"] != "ok" for s in states),
        "reused": sum(bool(s.get("reused")) for s in states),
        "seconds": round(time.perf_counter() - started, 2),
    }


@flow(name="lregions-batch-edit", task_runner=ThreadPoolTaskRunner(max_workers=4),
      log_prints=True)
def batch_edit(
    manifest: str,
    out: str,
    preset: str = "default",
    mode: str | None = None,
    sets: list[str] | None = None,
    chunk_size: int = 8,
    evaluate: bool = True,
    report: bool = True,
) -> dict:
    """Edit every row of ``manifest``; finished items of earlier runs are reused."""
    started = time.perf_counter()
    config = make_config(preset, {"mode": mode} if mode else None, sets or [])
    rows = read_manifest(manifest)
    states = run_stages(rows, config, out, chunk_size=chunk_size, evaluate=evaluate)
    store = Store(out)
    write_index(store, "index.parquet", states, config)
    summary = {**summarise(states, started), "index": f"{out.rstrip('/')}/index.parquet"}
    if report:
        summary["report"] = publish_report(out, summary)
    print(f"batch edit: {summary}")
    return summary


def publish_report(out: str, summary: dict) -> str | None:
    """Write the HTML report and, inside a flow run, publish its tables as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from lregions_core.report import summary_tables, write_report

    try:
        path = str(write_report(out))
    except OSError as exc:  # a report must never fail the batch (e.g. a remote output folder)
        print(f"report not written: {exc}")
        return None
    create_markdown_artifact(
        key="lregions-report",
        markdown=f"**{summary['ok']} ok, {summary['failed']} failed, {summary['reused']} "
        f"reused** in {summary['seconds']} s. Report: [{path}](file://{path})",
        description="lregions batch summary",
    )
    for name, table in summary_tables(out).items():
        key = "lregions-" + "".join(c if c.isalnum() else "-" for c in name.lower())
        create_table_artifact(key=key[:100], table=json.loads(table.to_json(orient="records")),
                              description=name)
    return path


def _index_row(state: dict, config: Config) -> dict:
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
    return {
        "id": row["id"],
        "status": "ok" if state["status"] == "ok" else "error",
        "error": state.get("error"),
        "final_path": state.get("final_path"),
        "box": ",".join(str(v) for v in box) if box else None,
        "text_sim": scores.get("text_sim"),
        "image_sim": scores.get("image_sim"),
        "loss": result.get("loss"),
        "selection_score": selection[chosen] if chosen is not None else None,
        "editor_requests": result.get("editor_requests"),
        "reused": bool(state.get("reused")),
        "seconds_ingest": seconds.get("ingest"),
        "seconds_features": seconds.get("features"),
        "seconds_regions": seconds.get("regions"),
        "seconds_outputs": seconds.get("select+outputs"),
        "config_hash": config.digest(),
        "seed": row["seed"] if row.get("seed") is not None else config.seed,
        "image": row["image"],
        "prompt": row["prompt"],
        "source": row.get("source"),
        "target_box": ",".join(str(v) for v in target) if target else None,
        "row": row["row"],
        **{m: metrics.get(m) for m in METRICS},
        "metrics_missing": json.dumps(missing) if state["status"] == "ok" else None,
        "metrics_weights": evaluation.get("weights"),
    }


def write_index(store: Store, rel: str, states: list[dict], config: Config):
    """Write one index row per state to ``rel``; returns the table (a pandas DataFrame)."""
    import pandas as pd

    frame = pd.DataFrame([_index_row(s, config) for s in states], columns=INDEX_COLUMNS)
    for metric in METRICS:
        frame[metric] = pd.to_numeric(frame[metric], errors="coerce").astype("float64")
    store.write_parquet(rel, frame)
    return frame
