"""One shard of a batch: the stages over a slice of manifest rows, on a GPU worker.

The coordinator (:mod:`flows.coordinator`) submits each shard as a flow run of the
``lregions-shard/<pool>`` deployment; a worker of that pool runs it. The shard writes its part of
the batch index (``index-parts/run=<run id>/s<shard>-<chunk>.parquet``, one part per chunk) and
its items; the coordinator merges the parts. A shard run again after a crash skips the chunks
whose parts it had written and reuses every item its rows had finished (the content-addressed
cache), so nothing is computed twice.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.batch_edit import summarise
from flows.chunks import run_chunks
from lregions_core import index
from lregions_core.config import run_config
from lregions_core.manifest import ManifestRow
from lregions_core.store import Store

SHARD_FLOW = "lregions-shard"
SHARD_TAG = "lregions-shard"  # on every shard run: the zombie-run automation matches it


def shard_prefix(shard: int) -> str:
    """Part-name prefix of a shard's chunks (part names sort in manifest order)."""
    return f"s{shard:06d}-"


@flow(name=SHARD_FLOW, task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def edit_shard(
    rows: list[dict],
    out: str,
    run_id: str,
    shard: int,
    preset: str = "default",
    mode: str | None = None,
    sets: list[str] | None = None,
    chunk_size: int = 8,
    evaluate: bool = True,
) -> dict:
    """Edit ``rows`` (manifest row records, checked by the coordinator) into ``out``."""
    started = time.perf_counter()
    config = run_config(preset, mode, sets)
    prefix = shard_prefix(shard)
    done = {p for p in index.done_parts(Store(out), "", run_id) if p.startswith(prefix)}
    counts = run_chunks([ManifestRow.from_record(r) for r in rows], config, out, run_id=run_id,
                        part_prefix=prefix, chunk_size=chunk_size, evaluate=evaluate,
                        done_parts=done)
    summary = {**summarise(counts, started), "shard": shard, "chunks_resumed": len(done)}
    print(f"shard {shard}: {summary}")
    return summary
