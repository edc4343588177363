"""Evaluation report: (re)write ``DIR/report.html`` for a batch or ablation folder and publish
its summary tables as Prefect artifacts (for a scheduled deployment after the nightly batch)."""

from __future__ import annotations

from prefect import flow

from flows.batch_edit import publish_report


@flow(name="lregions-report", log_prints=True)
def report(out: str) -> str | None:
    path = publish_report(out, {"ok": "-", "failed": "-", "reused": "-", "seconds": "-"})
    print(f"report: {path}")
    return path
