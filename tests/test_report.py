"""The HTML report on small fake output folders (written here with PIL + pandas, no Prefect):
relative links that exist, escaped manifest text, failed rows, the random-weights banner, the
ablation's tables and plots, and (when Chromium and playwright are installed) a real browser
that loads every image."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest
from conftest import render_in_chromium
from PIL import Image, ImageDraw

from lregions_core.report import RANDOM_BANNER, summary_tables, write_report

EVIL = "<script>alert('x')</script>"
METRICS = ["clip_text_image", "clip_image_image", "bg_ssim", "bg_lpips", "box_iou"]


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).rectangle((4, 4, size[0] // 2, size[1] // 2), outline=(255, 0, 0))
    image.save(path)


def _item(folder: Path, item_id: str, prompt: str, n: int, chosen: int,
          cache: Path | None = None) -> None:
    """An item as the outputs stage writes it: overlay, final and result.json in the item's
    folder; the input and the candidates in the (shared) cache, referred to from result.json."""
    item = folder / "items" / item_id
    cache = cache or folder / "cache"
    for name, colour in (("overlay", (60, 120, 60)), ("final", (160, 90, 40))):
        _png(item / f"{name}.png", (80, 60), colour)
    source = cache / "images" / f"{item_id}.png"
    _png(source, (80, 60), (40, 90, 160))
    candidates = []
    for i in range(n):
        cand = cache / "regions" / f"{item_id}-key" / f"cand_{i:02d}.png"
        _png(cand, (32, 24), (30 * i, 200, 90))
        candidates.append({
            "anchor": i, "proposal": i % 2, "box": [0, 0, 16, 16], "loss": 1.5 + i / 10,
            "scores": {"loss_clip": 1.0, "loss_dir": 0.4, "loss_str": 0.1,
                       "text_sim": 0.2 + i / 100, "image_sim": 0.9 - i / 100},
            "box_input": [0.0, 0.0, 40.0, 30.0],
            "image": os.path.relpath(cand, item),
        })
    result = {"id": item_id, "box": [0, 0, 40, 30], "chosen": chosen, "candidates": candidates,
              "input": os.path.relpath(source, item),
              "selection": [None] + [0.5 + i / 10 for i in range(1, n)],
              "manifest_row": {"prompt": prompt, "source": "a thing", "id": item_id}}
    (item / "result.json").write_text(json.dumps(result))


def make_batch(folder: Path, weights: str | None = "random", seed: int = 0,
               cache: Path | None = None) -> Path:
    """Two ok items (three candidates each) and one failed row."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = {"cat-hat": f"a cat wearing {EVIL}", "mug-tea": "a cup of green tea"}
    rows = []
    for k, (item_id, prompt) in enumerate(prompts.items()):
        _item(folder, item_id, prompt, n=3, chosen=2 - k, cache=cache)
        rows.append({
            "id": item_id, "status": "ok", "error": None,
            "final_path": f"items/{item_id}/final.png", "box": "0,0,40,30",
            "text_sim": 0.21 + k / 10 + seed / 100, "image_sim": 0.88 - k / 10, "loss": 1.7,
            "selection_score": 0.7, "editor_requests": 12, "reused": k == 1,
            "image": f"img/{item_id}.png", "prompt": prompt, "source": "a thing", "row": k + 1,
            **{m: 0.5 + k / 10 + seed / 50 for m in METRICS}, "bg_psnr": None,
            "metrics_missing": json.dumps({"bg_psnr": "no background left"}),
            "metrics_weights": weights,
        })
    rows.append({"id": "broken", "status": "error",
                 "error": "cannot read image: <not a PNG> & truncated", "final_path": None,
                 "image": "img/broken.png", "prompt": "p", "row": 3, "reused": False,
                 "metrics_missing": None, "metrics_weights": None})
    frame = pd.DataFrame(rows)
    frame["config_hash"] = "abc123"
    frame.to_parquet(folder / "index.parquet", index=False)
    return folder


def make_ablation(folder: Path) -> Path:
    """A paper-style grid: anchors x proposals (rgn, full losses), the four modes, two losses."""
    cells = [(a, p, "rgn", "clip+dir+str") for a in (4, 8) for p in (4, 7)]
    cells += [(4, 4, m, "clip+dir+str") for m in ("random", "dino-random", "exhaustive")]
    cells += [(4, 4, "rgn", "clip")]
    iou = {"rgn": 0.7, "exhaustive": 0.6, "dino-random": 0.4, "random": 0.2}
    rows = []
    for k, (a, p, mode, losses) in enumerate(cells):
        name = f"a{a}_p{p}_{mode}_L-{losses.replace('+', '-')}"
        make_batch(folder / "cells" / name, weights="pretrained", seed=k, cache=folder / "cache")
        rows.append({"cell": name, "num_anchors": a, "num_proposals": p, "mode": mode,
                     "losses": losses, "rows": 3, "ok": 2, "failed": 1,
                     "text_sim": 0.2 + a / 100 + p / 1000, "image_sim": 0.8 - a / 100,
                     "box_iou": iou[mode] + (a - 4) / 100 - (0.3 if losses == "clip" else 0),
                     "clip_text_image": 0.25 + a / 100, "clip_image_image": 0.9 - p / 100,
                     "bg_lpips": None})
    pd.DataFrame(rows).to_parquet(folder / "ablation.parquet", index=False)
    return folder


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.srcs.append(values["src"] or "")
        if tag in ("a", "link") and values.get("href"):
            self.hrefs.append(values["href"] or "")


def _refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _assert_local(page: Path, refs: list[str], top: Path) -> None:
    """Every link is relative, names an existing file, and stays inside the output folder."""
    for ref in refs:
        if ref.startswith("#"):
            continue
        assert "://" not in ref and not ref.startswith(("/", "\\")), ref
        target = (page.parent / unquote(ref)).resolve()
        assert target.is_file() and top.resolve() in target.parents, ref


def test_batch_report(tmp_path):
    folder = make_batch(tmp_path / "batch")
    page = Path(write_report(str(folder)))
    assert page == folder / "report.html"
    text = page.read_text(encoding="utf-8")
    refs = _refs(page)
    _assert_local(page, refs.srcs + refs.hrefs, folder)
    for item_id in ("cat-hat", "mug-tea"):
        expected = [f"cache/images/{item_id}.png", f"items/{item_id}/overlay.png",
                    f"items/{item_id}/final.png"]
        expected += [f"cache/regions/{item_id}-key/cand_{i:02d}.png" for i in range(3)]
        for src in expected:
            assert src in refs.srcs
    assert len(refs.srcs) == 2 * 6
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    failed = text.split("<h2>Failed rows</h2>", 1)[1]
    assert "cannot read image: &lt;not a PNG&gt; &amp; truncated" in failed
    assert "broken" in failed and "img/broken.png" in failed
    assert RANDOM_BANNER in text
    assert "bg_psnr" in text and "no background left" in text
    assert text.count('class="c chosen"') == 2  # one chosen candidate per item
    assert "abc123" in text


def test_banner_only_for_random_weights(tmp_path):
    page = Path(write_report(str(make_batch(tmp_path / "b", weights="pretrained"))))
    assert "RANDOM weights" not in page.read_text(encoding="utf-8")


def test_pruned_candidates_are_shown_without_images(tmp_path):
    folder = make_batch(tmp_path / "b")
    result_path = folder / "items" / "cat-hat" / "result.json"
    result = json.loads(result_path.read_text())
    for cand in result["candidates"][:2]:
        cand["image"] = None  # keep_candidates=chosen
    result_path.write_text(json.dumps(result))
    text = Path(write_report(str(folder))).read_text(encoding="utf-8")
    assert text.count("(no image)") == 2
    assert "cache/regions/cat-hat-key/cand_02.png" in _refs(folder / "report.html").srcs


def test_batch_summary_tables(tmp_path):
    tables = summary_tables(str(make_batch(tmp_path / "b")))
    assert set(tables) == {"Summary", "Metric means", "Items", "Missing metrics", "Failed rows"}
    assert tables["Missing metrics"].to_dict("records") == [
        {"reason": "no background left", "metrics": "bg_psnr", "rows": 2}]
    summary = tables["Summary"].iloc[0]
    assert (summary["rows"], summary["ok"], summary["failed"], summary["reused"]) == (3, 2, 1, 1)
    means = tables["Metric means"].set_index("metric")["mean"]
    assert means["box_iou"] == pytest.approx(0.55) and "bg_psnr" not in means
    assert tables["Failed rows"]["id"].tolist() == ["broken"]
    for table in tables.values():  # what the flows publish as Prefect table artifacts
        json.loads(table.to_json(orient="records"))


def test_ablation_report(tmp_path):
    folder = make_ablation(tmp_path / "abl")
    page = Path(write_report(str(folder)))
    text = page.read_text(encoding="utf-8")
    refs = _refs(page)
    _assert_local(page, refs.srcs + refs.hrefs, folder)
    for plot in ("anchors_proposals.png", "modes.png", "losses.png"):
        assert f"report_files/{plot}" in refs.srcs
        with Image.open(folder / "report_files" / plot) as image:
            assert image.size[0] > 100
    cells = pd.read_parquet(folder / "ablation.parquet")["cell"]
    for cell in cells:
        assert f"cells/{cell}/report.html" in refs.hrefs
        cell_page = folder / "cells" / cell / "report.html"
        srcs = _refs(cell_page).srcs
        _assert_local(cell_page, srcs, folder)
        assert "../../cache/images/cat-hat.png" in srcs  # the ablation's shared cache
    assert "RANDOM weights" not in text and "bg_lpips" not in text  # an all-empty column

    tables = summary_tables(str(folder))
    modes = tables["Learned vs random regions"]
    assert modes["mode"].tolist() == ["rgn", "exhaustive", "dino-random", "random"]
    assert modes["box_iou"].tolist() == pytest.approx([0.7, 0.6, 0.4, 0.2])  # full losses only
    grid = tables["Anchors x proposals: clip_text_image"]  # CLIP metrics win over the scores
    assert grid.columns.tolist() == ["num_anchors", "proposals=4", "proposals=7"]
    assert grid["proposals=7"].tolist() == pytest.approx([0.29, 0.33])
    assert "Anchors x proposals: text_sim" not in tables
    losses = tables["Loss terms"].set_index("losses")["box_iou"]
    assert losses["clip"] == pytest.approx(0.4) and losses["clip+dir+str"] == pytest.approx(0.7)
    assert re.search(r"<h2>Loss terms</h2><p class='muted'>mode = rgn; only settings run", text)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.parquet"):
        write_report(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        write_report("memory://lregions-test-empty/out")


def test_report_on_an_fsspec_store(tmp_path):
    """A batch folder on another file system (fsspec's in-memory one here; S3 is tested in
    test_object_store.py): the page and its links are the same as on disk."""
    import fsspec

    local = make_batch(tmp_path / "b")
    fs = fsspec.filesystem("memory")
    fs.put(str(local), "/lregions-test/b", recursive=True)
    try:
        url = write_report("memory://lregions-test/b")
        assert url == "memory://lregions-test/b/report.html"
        remote = fs.cat("/lregions-test/b/report.html").decode()
        on_disk = Path(write_report(str(local))).read_text(encoding="utf-8")
        assert remote == on_disk
    finally:
        fs.rm("/lregions-test", recursive=True)


@pytest.mark.parametrize("kind", ["batch", "ablation"])
def test_report_in_headless_chromium(tmp_path, kind):
    folder = (make_batch if kind == "batch" else make_ablation)(tmp_path / kind)
    shot = tmp_path / "report.png"
    images, scripts, requests = render_in_chromium(write_report(str(folder)), shot)
    assert images and all(image["ok"] for image in images), [i for i in images if not i["ok"]]
    assert scripts == 0
    assert all(url.startswith("file://") for url in requests), requests
    assert shot.stat().st_size > 10_000
    suffix = "" if kind == "batch" else "-ablation"
    shutil.copy(shot, f"/tmp/lregions-report-screenshot{suffix}.png")
