"""A batch killed with SIGKILL at several moments leaves a readable partial index that lists only
complete items, and a rerun ends with every row ok without touching a finished item."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from resume_helpers import MOMENTS, kill_at

from lregions_core.index import read_index
from lregions_core.store import Store

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT / "manifests" / "oracle.csv"
TOTAL = len(ORACLE.read_text().splitlines()) - 1


def finished_items(out: Path) -> dict[str, tuple[int, int]]:
    """Items whose result.json exists (written last): id -> (result.json, final.png) mtimes."""
    found = {}
    for result in (out / "items").glob("*/result.json"):
        found[result.parent.name] = (result.stat().st_mtime_ns,
                                     (result.parent / "final.png").stat().st_mtime_ns)
    return found


def partial_index(out: Path) -> pd.DataFrame | None:
    try:
        return read_index(Store(str(out)))
    except FileNotFoundError:
        return None


def assert_lists_only_complete_items(out: Path, table: pd.DataFrame) -> None:
    for row in table.itertuples():
        assert row.status == "ok", (row.id, row.error)
        result = json.loads((out / "items" / row.id / "result.json").read_text())
        assert result["id"] == row.id
        Image.open(out / row.final_path).load()


@pytest.mark.parametrize("moment", MOMENTS)
def test_killed_batch_resumes(prefect_server, tmp_path, moment):
    from flows.cli import main

    out = tmp_path / "out"
    args = [str(ORACLE), "--out", str(out), "--preset", "oracle", "--chunk-size", "4"]
    kill_at(moment, args, tmp_path / "marker")

    survivors = finished_items(out) if (out / "items").exists() else {}
    partial = partial_index(out)
    if moment == "before-any-row":
        assert partial is None and not survivors
    else:
        assert partial is not None and len(partial) >= 1
        assert_lists_only_complete_items(out, partial)
        assert set(partial["id"]) <= set(survivors)
    if moment == "mid-chunk":  # some complete items were not in the index yet
        assert set(survivors) - set(partial["id"])
    if moment == "during-merge":  # every row was in a part; the merged index was not written
        assert len(partial) == TOTAL and not (out / "index.parquet").exists()

    assert main(["edit", *args]) == 0
    table = pd.read_parquet(out / "index.parquet")
    assert len(table) == TOTAL and (table["status"] == "ok").all()
    # The rerun resumed the killed run: rows in its parts were carried over as they were; every
    # other item it had finished was reused, not recomputed.
    indexed = set() if partial is None else set(partial["id"])
    assert set(survivors) - indexed <= set(table.loc[table["reused"], "id"])
    assert {k: v for k, v in finished_items(out).items() if k in survivors} == survivors
    assert_lists_only_complete_items(out, table)
    assert not (out / "index-parts").exists()
    assert not list(out.glob(".index.parquet.*.tmp"))  # a merge killed half-way left nothing
