"""The Prefect batch pipeline end to end (one Prefect test server for the whole session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import render_in_chromium
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "manifests" / "demo.csv"
ORACLE = ROOT / "manifests" / "oracle.csv"


def run_cli(*args: str) -> int:
    from flows.cli import main

    return main(["edit", *args])


def index(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "index.parquet")


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file()}


def test_demo_manifest_end_to_end_then_rerun_reuses_everything(prefect_server, tmp_path):
    out = tmp_path / "demo"
    assert run_cli(str(DEMO), "--out", str(out), "--preset", "tiny") == 0
    table = index(out)
    assert list(table["status"]) == ["ok"] * 4
    for column in ("id", "status", "error", "final_path", "box", "text_sim", "image_sim",
                   "seconds_regions", "config_hash", "seed"):
        assert column in table.columns
    for row in table.itertuples():
        item = out / "items" / row.id
        assert sorted(p.name for p in item.iterdir()) == [
            "final.png", "layer.png", "metrics.json", "overlay.png", "result.json"]
        result = json.loads((item / "result.json").read_text())
        cands = [(item / c["image"]).resolve() for c in result["candidates"]]
        assert len(cands) == 9 and all(p.is_file() for p in cands)
        assert all(out.resolve() / "cache" / "regions" in p.parents for p in cands)
        x0, y0, x1, y1 = map(int, row.box.split(","))
        source = Image.open(item / result["input"])
        assert Image.open(item / "final.png").size == source.size
        assert 0 <= x0 < x1 <= source.width and 0 <= y0 < y1 <= source.height
    assert not list(out.rglob("*.tmp")) and not (out / "index-parts").exists()
    # every candidate image is stored once, in the regions cache (items refer to it)
    pngs = [p for p in out.rglob("*.png") if "report_files" not in p.parts]
    assert len(pngs) == 4 * 9 + 4 * 3 + 4  # candidates; final, layer, overlay per item; inputs
    assert table["metrics_weights"].eq("random").all()  # tiny preset: said, not hidden
    assert table["clip_text_image"].notna().all() and table["box_iou"].isna().all()

    # the report of the real demo output renders with every image loaded
    images, _, _ = render_in_chromium(out / "report.html", tmp_path / "demo-report.png")
    assert len(images) > 4 * 11 and all(i["ok"] for i in images)

    before = mtimes(out / "items")
    assert run_cli(str(DEMO), "--out", str(out), "--preset", "tiny") == 0
    again = index(out)
    assert again["reused"].all()
    assert list(again["box"]) == list(table["box"])
    changed = {k for k, v in mtimes(out / "items").items() if before.get(k) != v}
    assert not changed, changed  # nothing rewritten


def test_bad_rows_fail_alone(prefect_server, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((60, 80, 3), 120, np.uint8)).save(folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    manifest = folder / "m.csv"
    manifest.write_text(
        "\ufeffid,image,prompt\n"
        "good,good.png,a red hat\n"
        "missing,nope.png,a red hat\n"
        "corrupt,corrupt.png,a red hat\n"
        "empty,good.png,\n"
        "good,good.png,a blue hat\n"
        "../escape,good.png,a red hat\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert run_cli(str(manifest), "--out", str(out), "--preset", "tiny",
                   "--set", "num_anchors=2", "--set", "iterations=1") == 1
    table = index(out).set_index("row")
    assert table.loc[1, "status"] == "ok"
    assert [table.loc[i, "status"] for i in range(2, 7)] == ["error"] * 5
    assert "nope.png" in table.loc[2, "error"]
    assert "corrupt.png" in table.loc[3, "error"]
    assert "prompt" in table.loc[4, "error"]
    assert "duplicate" in table.loc[5, "error"]
    assert "unsafe" in table.loc[6, "error"]
    assert sorted(p.name for p in (out / "items").iterdir()) == ["good"]
    assert not (tmp_path / "escape").exists()


def test_usage_errors_exit_2(prefect_server, tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("picture,text\nx.png,hi\n")
    assert run_cli(str(bad), "--out", str(tmp_path / "o")) == 2
    assert run_cli(str(tmp_path / "absent.csv"), "--out", str(tmp_path / "o")) == 2
    assert not (tmp_path / "o").exists()


def test_changing_proposals_reuses_dino_features(prefect_server, tmp_path):
    out = tmp_path / "out"
    args = [str(DEMO), "--out", str(out), "--preset", "tiny", "--set", "num_anchors=2",
            "--set", "iterations=1"]
    assert run_cli(*args, "--set", "num_proposals=3") == 0
    features = mtimes(out / "cache" / "features")
    regions_before = set(mtimes(out / "cache" / "regions"))
    assert len(features) == 4
    assert run_cli(*args, "--set", "num_proposals=4") == 0
    assert mtimes(out / "cache" / "features") == features  # reused, not rewritten
    assert set(mtimes(out / "cache" / "regions")) > regions_before  # regions recomputed
    assert not index(out)["reused"].any()


def test_oracle_noise_from_the_command_line_is_cached_like_other_settings(prefect_server,
                                                                           tmp_path):
    manifest = tmp_path / "v2.csv"
    lines = (ROOT / "manifests" / "oracle_v2.csv").read_text().splitlines()[:4]
    shutil.copytree(ROOT / "manifests" / "oracle_v2", tmp_path / "oracle_v2")
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = [str(manifest), "--out", str(out), "--preset", "oracle", "--set", "iterations=2"]
    assert run_cli(*args) == 0
    exact = index(out)
    features = mtimes(out / "cache" / "features")
    regions = set(mtimes(out / "cache" / "regions"))
    assert run_cli(*args, "--set", "oracle_noise=0.1") == 0
    noisy = index(out)
    assert list(noisy["status"]) == ["ok"] * 3 and not noisy["reused"].any()
    assert set(noisy["config_hash"]).isdisjoint(exact["config_hash"])
    assert mtimes(out / "cache" / "features") == features  # the judge's noise is not a feature
    assert set(mtimes(out / "cache" / "regions")) > regions  # the edits' scores are new
    assert not np.allclose(noisy["text_sim"], exact["text_sim"])  # the judge is noisy now
    assert run_cli(*args, "--set", "oracle_noise=0.1") == 0  # the same setting again: reused
    assert index(out)["reused"].all()
    assert run_cli(*args, "--set", "oracle_noise=-1") == 2  # validated like any setting


def test_prefect_yaml_deployments_point_at_the_flow():
    import importlib

    import yaml
    from prefect.client.schemas.schedules import CronSchedule

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {d["name"]: d for d in spec["deployments"]}
    assert {"batch-edit-nightly", "batch-edit"} <= set(names)
    CronSchedule(cron=names["batch-edit-nightly"]["schedules"][0]["cron"])  # raises if invalid
    for deployment in spec["deployments"]:
        path, _, func = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        parameters = deployment.get("parameters") or {}
        assert set(parameters) <= set(flow.parameters.properties)
        if "manifest" in parameters:
            assert (ROOT / parameters["manifest"]).is_file()
    assert "evaluation-report-nightly" in names


def test_every_setting_is_read_by_a_stage_or_is_operational():
    """A new Config field must be put in a stage's settings, or caches would ignore it."""
    import dataclasses

    from lregions_core.config import Config
    from lregions_core.stages import OPERATIONAL_SETTINGS, STAGE_SETTINGS

    covered = set(OPERATIONAL_SETTINGS).union(*STAGE_SETTINGS.values())
    assert {f.name for f in dataclasses.fields(Config)} == covered


def test_missing_weights_fail_rows_with_the_reason_and_load_once(prefect_server, tmp_path,
                                                                  offline_hub, monkeypatch):
    from lregions_core import pipeline
    from lregions_core.pipeline import Models

    calls = []
    real_load = Models.load.__func__

    def counting_load(cls, config):
        calls.append(1)
        return real_load(cls, config)

    monkeypatch.setattr(Models, "load", classmethod(counting_load))
    pipeline._shared_models.cache_clear()
    out = tmp_path / "out"
    code = run_cli(str(DEMO), "--out", str(out), "--preset", "tiny", "--set",
                   "random_weights=false", "--set", "clip_pretrained=openai")
    assert code == 1
    table = index(out)
    assert (table["status"] == "error").all()
    assert table["error"].str.contains("weights for the").all()
    assert table["error"].str.contains("lregions download").all()
    assert len(calls) == 1  # the failure is remembered, not retried per row
    pipeline._shared_models.cache_clear()
