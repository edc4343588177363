"""Batch edit in one process: a CSV manifest of image/prompt rows in, ``OUT/items/<id>/`` and
``OUT/index.parquet`` out. Reads top to bottom like the job: check the manifest, take the output
folder's lease (one run writes into a folder at a time), run the stages over it chunk by chunk
(index parts written as chunks finish), merge the index, write the report.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.chunks import run_chunks
from lregions_core import index, lease
from lregions_core.config import run_config
from lregions_core.manifest import read_manifest
from lregions_core.store import Store

# Called with the number of rows that just finished (ok or failed): the command line's progress
# bar. (Flow parameters must be plain data, so a callback cannot be one.)
PROGRESS: list = []


def advance(rows: int) -> None:
    for callback in PROGRESS:
        callback(rows)


def hold_output(out: str, wait_lock: float) -> contextlib.AbstractContextManager[lease.Lease]:
    """The lease on output folder ``out`` for this flow run (:func:`lregions_core.lease.hold`):
    it joins the lease when this process holds it already (``lregions edit`` and ``lregions
    ablate`` take it before Prefect starts), else takes it, naming this flow run as the holder,
    waiting up to ``wait_lock`` seconds for another run's."""
    from prefect.runtime import flow_run

    return lease.hold(out, wait=wait_lock,
                      command=f"flow run {flow_run.name} of {flow_run.flow_name}")


def summarise(counts: Counter, started: float) -> dict:
    return {"rows": counts["rows"], "ok": counts["ok"], "failed": counts["failed"],
            "reused": counts["reused"], "seconds": round(time.perf_counter() - started, 2)}


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
    wait_lock: float = 0.0,
) -> dict:
    """Edit every row of ``manifest``; finished items of earlier runs are reused. Another run
    holding ``out`` makes this one fail at once, or after waiting ``wait_lock`` seconds."""
    started = time.perf_counter()
    config = run_config(preset, mode, sets)
    rows = read_manifest(manifest)
    store = Store(out)
    with hold_output(out, wait_lock) as held:
        # A run killed earlier with the same rows and settings is resumed: its parts are kept.
        run_id, done = index.begin_run(
            store, "", index.fingerprint(rows, config, chunk_size=chunk_size, evaluate=evaluate))
        counts = run_chunks(rows, config, out, run_id=run_id, chunk_size=chunk_size,
                            evaluate=evaluate, done_parts=done, on_rows=advance)
        held.check()
        index.merge(store, "", run_id)
        summary = {**summarise(counts, started), "index": store.url_of(index.INDEX)}
        if report:
            summary["report"] = publish_report(out, summary)
    print(f"batch edit: {summary}")
    return summary


def publish_report(out: str, summary: dict) -> str | None:
    """Write the HTML report and, inside a flow run, publish its tables as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from lregions_core.report import summary_tables, write_report

    try:
        page = write_report(out)
    except OSError as exc:  # a report must never fail the batch
        print(f"report not written: {exc}")
        return None
    link = page if "://" in page else f"file://{page}"
    create_markdown_artifact(
        key="lregions-report",
        markdown=f"**{summary['ok']} ok, {summary['failed']} failed, {summary['reused']} "
        f"reused** in {summary['seconds']} s. Report: [{page}]({link})",
        description="lregions batch summary",
    )
    for name, table in summary_tables(out).items():
        key = "lregions-" + "".join(c if c.isalnum() else "-" for c in name.lower())
        create_table_artifact(key=key[:100], table=json.loads(table.to_json(orient="records")),
                              description=name)
    return page
