"""Batch edit: a CSV manifest of image/prompt rows in, ``OUT/items/<id>/`` and
``OUT/index.parquet`` out. Reads top to bottom like the method's stages."""

from __future__ import annotations

import time

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from lregions_core.config import make_config
from lregions_core.manifest import read_manifest
from lregions_core.store import Store
from tasks.stages import features_chunk, ingest_chunk, outputs_chunk, regions_chunk

INDEX_COLUMNS = [
    "id", "status", "error", "final_path", "box", "text_sim", "image_sim", "loss",
    "selection_score", "editor_requests", "reused", "seconds_ingest", "seconds_features",
    "seconds_regions", "seconds_outputs", "config_hash", "seed", "image", "prompt", "source",
    "target_box", "row",
]


def initial_state(row) -> dict:
    failed = row.error is not None
    return {"row": row.to_record(), "status": "error" if failed else "pending",
            "error": row.error, "seconds": {}, "reused": False}


@flow(name="lregions-batch-edit", task_runner=ThreadPoolTaskRunner(max_workers=4),
      log_prints=True)
def batch_edit(
    manifest: str,
    out: str,
    preset: str = "default",
    mode: str | None = None,
    sets: list[str] | None = None,
    chunk_size: int = 8,
) -> dict:
    """Edit every row of ``manifest``; finished items of earlier runs are reused."""
    started = time.perf_counter()
    config = make_config(preset, {"mode": mode} if mode else None, sets or [])
    settings = config.to_dict()
    rows = read_manifest(manifest)
    states = [initial_state(row) for row in rows]
    chunks = [states[i : i + chunk_size] for i in range(0, len(states), chunk_size)]

    finished = []
    for chunk in chunks:
        ingested = ingest_chunk.submit(chunk, settings, out)
        featured = features_chunk.submit(ingested, settings, out)
        regioned = regions_chunk.submit(featured, settings, out)
        finished.append(outputs_chunk.submit(regioned, settings, out))
    done = [state for future in finished for state in future.result()]

    write_index(Store(out), done, config.digest(), config.seed)
    summary = {
        "rows": len(done),
        "ok": sum(s["status"] == "ok" for s in done),
        "failed": sum(s["status"] != "ok" for s in done),
        "reused": sum(bool(s.get("reused")) for s in done),
        "seconds": round(time.perf_counter() - started, 2),
        "index": f"{out.rstrip('/')}/index.parquet",
    }
    print(f"batch edit: {summary}")
    return summary


def _index_row(state: dict, config_hash: str, default_seed: int) -> dict:
    row = state["row"]
    result = state.get("result") or {}
    scores = result.get("scores") or {}
    chosen = result.get("chosen")
    selection = result.get("selection") or []
    seconds = state.get("seconds", {})
    box = state.get("box")
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
        "config_hash": config_hash,
        "seed": row["seed"] if row.get("seed") is not None else default_seed,
        "image": row["image"],
        "prompt": row["prompt"],
        "source": row.get("source"),
        "target_box": ",".join(str(v) for v in row["target_box"]) if row.get("target_box")
        else None,
        "row": row["row"],
    }


def write_index(store: Store, states: list[dict], config_hash: str, seed: int) -> None:
    import pandas as pd

    frame = pd.DataFrame([_index_row(s, config_hash, seed) for s in states],
                         columns=INDEX_COLUMNS)
    store.write_parquet("index.parquet", frame)
