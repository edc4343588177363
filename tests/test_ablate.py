"""The ablation flow: a grid over the oracle world shares cached stages across cells and
reproduces the paper's ordering (learned > dino-random > random on box IoU)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_grid_shares_features_and_orders_modes(prefect_server, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "preset: oracle\n"
        "grid:\n"
        "  num_anchors: [6]\n"
        "  mode: [rgn, dino-random, random]\n"
        "  losses: [clip+dir+str, clip]\n"
    )
    manifest = tmp_path / "m.csv"
    lines = (ROOT / "manifests" / "oracle.csv").read_text().splitlines()
    folder = ROOT / "manifests"
    rows = [lines[0]] + [
        line.replace("oracle/", f"{folder}/oracle/", 1) for line in lines[1:17]
    ]
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "abl"
    assert main(["ablate", str(manifest), "--out", str(out), "--grid", str(grid)]) == 0

    table = pd.read_parquet(out / "ablation.parquet")
    assert len(table) == 6 and (table["failed"] == 0).all() and (table["ok"] == 16).all()
    full = table[table["losses"] == "clip+dir+str"].set_index("mode")
    assert full.loc["rgn", "box_iou"] > full.loc["dino-random", "box_iou"] + 0.1
    assert full.loc["dino-random", "box_iou"] > full.loc["random", "box_iou"] + 0.1
    # without L_dir and L_str the learner favours large boxes: worse boxes, as in the paper
    only_clip = table[table["losses"] == "clip"].set_index("mode")
    assert only_clip.loc["rgn", "box_iou"] < full.loc["rgn", "box_iou"]
    # features computed once per image for the whole grid
    assert len(list((out / "cache" / "features").glob("*.parquet"))) == 16
    for cell in table["cell"]:
        cell_index = pd.read_parquet(out / "cells" / cell / "index.parquet")
        assert (cell_index["status"] == "ok").all()
        assert (out / "cells" / cell / "items").is_dir()
    assert (out / "report.html").is_file()
    page = (out / "report.html").read_text()
    assert "Box IoU against editor calls" in page  # every cell on one quality-for-cost plot
    assert list(out.rglob("iou_vs_calls.png"))


def test_bad_grid_is_a_usage_error(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  colour: [red]\n")
    manifest = ROOT / "manifests" / "oracle.csv"
    assert main(["ablate", str(manifest), "--out", str(tmp_path / "o"), "--grid", str(grid)]) == 2
    assert main(["ablate", str(manifest), "--out", str(tmp_path / "o"), "--grid",
                 str(tmp_path / "absent.yaml")]) == 2


@pytest.mark.parametrize("text", ["grid: {losses: [clip+colour]}", "grid: {mode: [sideways]}"])
def test_invalid_cells_are_refused_before_work(tmp_path, text):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text + "\n")
    manifest = ROOT / "manifests" / "oracle.csv"
    assert main(["ablate", str(manifest), "--out", str(tmp_path / "o"), "--grid", str(grid),
                 "--preset", "oracle"]) == 2
    assert not (tmp_path / "o").exists()
