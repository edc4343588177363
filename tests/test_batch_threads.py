"""The batch gives every row the same result whether its stages run in one task thread or in the
default four: identical index rows (box, scores, metrics, status) and identical final.png bytes.
Rows of one size are the case where a result handed to the wrong photo raises no error at all.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import noise_image

SIZES = [(96, 64)] * 6 + [(64, 96), (80, 80), (120, 60), (64, 96)]
TIMINGS = ("reused",)  # besides the seconds_* columns, what may differ per run


def manifest(folder: Path) -> Path:
    rows = ["id,image,prompt,source"]
    for i, (w, h) in enumerate(SIZES):
        noise_image(w, h, seed=i).save(folder / f"p{i}.png")
        rows.append(f"p{i},p{i}.png,a red thing number {i},a thing")
    path = folder / "m.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def run(path: Path, out: Path, threads: int, sets: list[str]) -> pd.DataFrame:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.batch_edit import batch_edit

    flow = batch_edit.with_options(task_runner=ThreadPoolTaskRunner(max_workers=threads))
    summary = flow(manifest=str(path), out=str(out), preset="tiny", sets=sets, chunk_size=2,
                   report=False)
    assert summary["ok"] == len(SIZES), summary
    table = pd.read_parquet(out / "index.parquet")
    return table.drop(columns=[c for c in table.columns
                               if c.startswith("seconds_") or c in TIMINGS])


@pytest.mark.parametrize("sets", [[], ["region_shape=auto"]], ids=["box", "auto"])
def test_one_thread_and_four_give_the_same_rows_and_images(prefect_server, tmp_path, sets):
    path = manifest(tmp_path)
    sets = [*sets, "num_anchors=3", "iterations=2"]
    alone = run(path, tmp_path / "one", 1, sets)
    together = run(path, tmp_path / "four", 4, sets)
    pd.testing.assert_frame_equal(alone, together)
    assert alone["box"].nunique() > 1  # the rows differ, so a mix-up would show
    for row in alone.itertuples():
        one = (tmp_path / "one" / row.final_path).read_bytes()
        four = (tmp_path / "four" / row.final_path).read_bytes()
        assert one == four, row.id
