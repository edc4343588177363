"""Ingesting benchmarks and photo sets into manifests, the target_mask column and the PIE-Bench
metrics (pie_*): synthetic sources in each published layout, read back with read_manifest."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from lregions_core.cli import main as cli_main
from lregions_core.ingest import decode_rle, ingest, safe_id
from lregions_core.manifest import read_manifest
from lregions_core.metrics import pie_background, pie_ssim


def png_bytes(color: tuple[int, int, int], size=(40, 32), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    image.putpixel((3, 4), (255 - color[0], 0, 0))  # distinct content per colour
    image.save(buffer, fmt)
    return buffer.getvalue()


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def files_with_mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.suffix != ".csv"}


# -- TEdBench -----------------------------------------------------------------------------------
def make_tedbench(root: Path) -> Path:
    (root / "originals").mkdir(parents=True)
    (root / "originals" / "cat.jpeg").write_bytes(png_bytes((200, 100, 0), fmt="JPEG"))
    (root / "originals" / "dog.png").write_bytes(png_bytes((0, 100, 200)))
    entries = [{"img_name": "cat.jpeg", "target_text": "A photo of a sitting cat"},
               {"img_name": "dog.png", "target_text": "A dog  jumping"},
               {"img_name": "cat.jpeg", "target_text": "A cat wearing a hat"},
               {"img_name": "gone.png", "target_text": "missing"},
               {"img_name": "dog.png", "target_text": "   "},
               {"img_name": "../../etc/passwd", "target_text": "escape"}]
    (root / "input_list.json").write_text(json.dumps(entries))
    return root


def test_tedbench_rows_and_rejections_with_reasons(tmp_path, capsys):
    source = make_tedbench(tmp_path / "tedbench")
    out = tmp_path / "out" / "ted.csv"
    assert cli_main(["ingest", "tedbench", str(source), "--out", str(out)]) == 1
    rows = read_manifest(out)
    assert [r.error for r in rows] == [None] * 3
    assert [r.id for r in rows] == ["cat", "dog", "cat-2"]
    assert [r.prompt for r in rows] == ["A photo of a sitting cat", "A dog jumping",
                                        "A cat wearing a hat"]
    assert rows[0].image == str((source / "originals" / "cat.jpeg").resolve())
    assert csv_rows(out)[0]["image"] == "../tedbench/originals/cat.jpeg"  # relative to it
    rejected = csv_rows(tmp_path / "out" / "ted.rejected.csv")
    reasons = {r["record"]: r["reason"] for r in rejected}
    assert "image not found" in reasons["input_list.json[3]"]
    assert reasons["input_list.json[4]"] == "empty prompt"
    assert "leads outside" in reasons["input_list.json[5]"]
    printed = capsys.readouterr().out
    assert "rejected input_list.json[3]" in printed and "3 rejected" in printed


def test_limit_takes_the_first_records_and_a_clean_source_exits_0(tmp_path):
    source = make_tedbench(tmp_path / "tedbench")
    out = tmp_path / "ted.csv"
    assert cli_main(["ingest", "tedbench", str(source), "--out", str(out), "--limit", "2"]) == 0
    assert [r.id for r in read_manifest(out)] == ["cat", "dog"]
    assert not (tmp_path / "ted.rejected.csv").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    out = str(tmp_path / "m.csv")
    assert cli_main(["ingest", "tedbench", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "input_list.json: file not found" in capsys.readouterr().err
    (tmp_path / "photos.tsv000").write_text("photo_id\tphoto_image_url\n")
    assert cli_main(["ingest", "unsplash", str(tmp_path), "--out", out]) == 2  # no prompt
    with pytest.raises(SystemExit) as exc:
        cli_main(["ingest", "nope", str(tmp_path), "--out", out])
    assert exc.value.code == 2


# -- PIE-Bench ----------------------------------------------------------------------------------
def make_pie(root: Path, n: int = 3) -> tuple[Path, np.ndarray]:
    """A PIE-Bench folder: 512x512 images, and masks as run lengths (flat and as pairs)."""
    images = root / "annotation_images" / "0_random_140"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = np.zeros((512, 512), dtype=bool)
    expected[100:180, 200:330] = True  # rows 100..179, columns 200..329
    expected[300, 5:9] = True
    runs = []
    for y in range(512):
        xs = np.nonzero(expected[y])[0]
        if len(xs):
            runs += [int(y * 512 + xs[0]), len(xs)]
    mapping = {}
    for i in range(n):
        pixels = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:012d}.jpg", quality=95)
        mask = runs if i % 2 == 0 else [list(p) for p in zip(runs[::2], runs[1::2])]
        mapping[f"{i:012d}"] = {
            "image_path": f"0_random_140/{i:012d}.jpg",
            "original_prompt": "a [cat] sitting on the grass",
            "editing_prompt": "a [red dog] sitting on the grass",
            "editing_instruction": "Make the cat a red dog",
            "editing_type_id": "0", "blended_word": "cat dog", "mask": mask,
        }
    mapping["bad-mask"] = {**mapping["000000000000"], "mask": [5, 10, 7]}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root, expected


def test_decode_rle_both_layouts_and_bad_masks():
    flat = decode_rle([2, 3, 10, 1], shape=(4, 4))
    assert np.array_equal(np.nonzero(flat.ravel())[0], [2, 3, 4, 10])
    assert np.array_equal(decode_rle([[2, 3], [10, 1]], shape=(4, 4)), flat)
    assert decode_rle([14, 9], shape=(4, 4)).sum() == 2  # cut at the end, as PIE-Bench does
    for bad in ([1, 2, 3], [16, 1], [-1, 2], "1 2", [1.5, 2]):
        with pytest.raises(ValueError):
            decode_rle(bad, shape=(4, 4))


def test_pie_bench_prompts_mask_and_box(tmp_path):
    source, expected = make_pie(tmp_path / "PIE-Bench_v1")
    out = tmp_path / "out" / "pie.csv"
    done = ingest("pie-bench", source, out)
    rows = read_manifest(out)
    assert [r.id for r in rows] == ["000000000000", "000000000001", "000000000002"]
    assert all(r.error is None for r in rows)
    assert rows[0].prompt == "a red dog sitting on the grass"
    assert rows[0].source == "a cat sitting on the grass"
    assert rows[0].target_box == (5, 100, 330, 301)
    mask = np.asarray(Image.open(rows[0].target_mask))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    # every decoded pixel, exactly, plus the 1-pixel border PIE-Bench's decoder adds
    bordered = expected.copy()
    bordered[0, :] = bordered[-1, :] = bordered[:, 0] = bordered[:, -1] = True
    assert np.array_equal(mask == 255, bordered)
    assert len({r.target_mask for r in rows}) == 1  # one mask, written once
    assert done.written == [Path(rows[0].target_mask).relative_to(out.parent).as_posix()]
    assert [r["id"] for r in done.rejected] == ["bad-mask"]
    assert "undecodable mask" in done.rejected[0]["reason"]


# -- Emu Edit and MagicBrush (Parquet) ------------------------------------------------------------
def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_emu_edit_parquet_folder_images_written_once(tmp_path):
    red, blue = png_bytes((200, 0, 0)), png_bytes((0, 0, 200), fmt="JPEG")
    base = {"task": "local", "hash": "h", "split": "test"}
    write_parquet(tmp_path / "emu" / "test-00000-of-00002.parquet", [
        {**base, "idx": 0, "image": {"bytes": red, "path": None}, "instruction": "make it blue",
         "input_caption": "a red square", "output_caption": "a blue square"},
        {**base, "idx": 1, "image": {"bytes": blue, "path": "x.jpg"}, "instruction": "add a hat",
         "input_caption": "a blue square", "output_caption": ""},
    ])
    write_parquet(tmp_path / "emu" / "test-00001-of-00002.parquet", [
        {**base, "idx": 2, "image": {"bytes": red, "path": None}, "instruction": "  ",
         "input_caption": "a red square", "output_caption": None},
        {**base, "idx": 3, "image": {"bytes": b"not an image", "path": None},
         "instruction": "x", "input_caption": "", "output_caption": "y"},
        {**base, "idx": 0, "image": {"bytes": blue, "path": None}, "instruction": "dup",
         "input_caption": "", "output_caption": "dup"},
    ])
    out = tmp_path / "out" / "emu.csv"
    done = ingest("emu-edit", tmp_path / "emu", out)
    rows = read_manifest(out)
    assert [(r.id, r.prompt, r.source) for r in rows] == [
        ("0", "a blue square", "a red square"), ("1", "add a hat", "a blue square")]
    assert Path(rows[0].image).read_bytes() == red and rows[0].image.endswith(".png")
    assert Path(rows[1].image).read_bytes() == blue and rows[1].image.endswith(".jpg")
    reasons = {r["record"]: r["reason"] for r in done.rejected}
    assert reasons["test-00001-of-00002.parquet[0]"] == "empty prompt"
    assert "not a readable image" in reasons["test-00001-of-00002.parquet[1]"]
    assert "duplicate id '0'" in reasons["test-00001-of-00002.parquet[2]"]
    before = files_with_mtimes(out.parent)
    again = ingest("emu-edit", tmp_path / "emu", out)
    assert again.written == [] and files_with_mtimes(out.parent) == before


def test_magicbrush_mask_conventions(tmp_path):
    source = png_bytes((10, 200, 10), size=(16, 12))
    white = np.zeros((12, 16), np.uint8)
    white[2:5, 3:9] = 255  # opaque mask: white marks the edit
    rgba = np.full((12, 16, 4), 255, np.uint8)
    rgba[6:10, 1:4, 3] = 0  # transparent marks the edit (DALL-E 2 convention)

    def encoded(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        return buffer.getvalue()

    write_parquet(tmp_path / "mb.parquet", [
        {"img_id": "242679", "turn_index": 1, "source_img": {"bytes": source, "path": None},
         "mask_img": {"bytes": encoded(white), "path": None}, "instruction": "put a hat on it",
         "target_img": {"bytes": source, "path": None}},
        {"img_id": "242679", "turn_index": 2, "source_img": {"bytes": source, "path": None},
         "mask_img": {"bytes": encoded(rgba), "path": None}, "instruction": "make it night",
         "target_img": {"bytes": source, "path": None}},
        {"img_id": "9", "turn_index": 1, "source_img": {"bytes": source, "path": None},
         "mask_img": {"bytes": b"\x89PNG broken", "path": None}, "instruction": "x",
         "target_img": {"bytes": source, "path": None}},
    ])
    out = tmp_path / "mb.csv"
    done = ingest("magicbrush", tmp_path / "mb.parquet", out)
    rows = read_manifest(out)
    assert [(r.id, r.prompt, r.source) for r in rows] == [
        ("242679-1", "put a hat on it", None), ("242679-2", "make it night", None)]
    assert np.array_equal(np.asarray(Image.open(rows[0].target_mask)) == 255, white == 255)
    assert rows[0].target_box == (3, 2, 9, 5)
    assert np.array_equal(np.asarray(Image.open(rows[1].target_mask)) == 255,
                          rgba[..., 3] == 0)
    assert rows[1].target_box == (1, 6, 4, 10)
    assert "undecodable mask_img" in done.rejected[0]["reason"]


# -- Unsplash and folders -----------------------------------------------------------------------
def write_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [("photo_id\tphoto_url\tphoto_image_url\tphoto_width\tphoto_height\t"
             "photo_description\tai_description"),
             ("XMyPniM9LF0\thttps://unsplash.com/photos/XMyPniM9LF0\t"
             "https://images.unsplash.com/uploads/14119\t4272\t2848\t\tbrown wooden house"),
             ("rDLBArZUl1c\thttps://unsplash.com/photos/rDLBArZUl1c\t"
             "https://images.unsplash.com/photo-1?ixid=abc\t3000\t4000\ta dog on a beach\t"),
             "bad\tx\tftp://nowhere/x\t1\t1\t\t"]
    (folder / "photos.tsv000").write_text("\n".join(lines) + "\n")
    return folder / "photos.tsv000"


def test_unsplash_width_urls_and_prompts_csv(tmp_path):
    tsv = write_photos(tmp_path / "unsplash-lite")
    out = tmp_path / "u.csv"
    assert cli_main(["ingest", "unsplash", str(tsv), "--out", str(out), "--prompt",
                     "a painting", "--width", "640"]) == 1  # the ftp URL is rejected
    rows = read_manifest(out)
    assert [r.image for r in rows] == ["https://images.unsplash.com/uploads/14119?w=640",
                                       "https://images.unsplash.com/photo-1?ixid=abc&w=640"]
    assert [r.source for r in rows] == ["brown wooden house", "a dog on a beach"]
    assert [r.id for r in rows] == ["XMyPniM9LF0", "rDLBArZUl1c"]
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("photo_id,prompt,source\nrDLBArZUl1c,a cat on a beach,a dog\n"
                       "rDLBArZUl1c,a red dog,\nnot-there,x,\n")
    done = ingest("unsplash", tmp_path / "unsplash-lite", out, prompts=str(prompts))
    rows = read_manifest(out)
    assert [(r.id, r.prompt, r.source) for r in rows] == [
        ("rDLBArZUl1c", "a cat on a beach", "a dog"),
        ("rDLBArZUl1c-2", "a red dog", "a dog on a beach")]
    assert rows[0].image == "https://images.unsplash.com/photo-1?ixid=abc"
    assert "'not-there' is not in" in done.rejected[0]["reason"]


def test_folder_of_images_with_prompts_csv(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "My Photo.png").write_bytes(png_bytes((1, 2, 3)))
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("image,prompt,source\nMy Photo.png,a red car,a car\n"
                       "missing.jpg,a boat,\n/etc/hosts,x,\n")
    out = tmp_path / "out" / "f.csv"
    done = ingest("folder", photos, out, prompts=str(prompts))
    rows = read_manifest(out)
    assert len(rows) == 1 and rows[0].error is None
    assert rows[0].id == safe_id("My Photo") and rows[0].id.startswith("My-Photo-")
    assert (rows[0].prompt, rows[0].source) == ("a red car", "a car")
    reasons = [r["reason"] for r in done.rejected]
    assert "image not found" in reasons[0] and "absolute path" in reasons[1]


def test_safe_ids():
    assert safe_id("000000000001") == "000000000001"
    for raw in ("../../x", ".hidden", "a/b", "é", "x" * 300):
        made = safe_id(raw)
        assert len(made) <= 100 and not made.startswith(".") and ".." not in made
        assert made.replace("-", "").replace("_", "").replace(".", "").isalnum()
    assert safe_id("a/b") != safe_id("a-b")


# -- target_mask in manifests and the pie_* metrics ---------------------------------------------
def test_bad_target_mask_fails_its_row_naming_the_file(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes((5, 5, 5)))
    (tmp_path / "notpng.png").write_text("hello")
    (tmp_path / "m.csv").write_text("image,prompt,target_mask\na.png,x,gone.png\n"
                                    "a.png,y,notpng.png\na.png,z,\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert "target_mask not found" in rows[0].error and "gone.png" in rows[0].error
    assert "notpng.png is not a readable image" in rows[1].error
    assert rows[2].error is None and rows[2].target_mask is None
    assert "target_mask" not in rows[2].to_record()  # records of rows without one unchanged


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM as torchmetrics computes it (11x11 Gaussian, sigma 1.5, reflect padding, the map
    averaged over every pixel and channel), written out with numpy and scipy."""
    d = np.arange(-5, 6, dtype=np.float64)
    g = np.exp(-((d / 1.5) ** 2) / 2)
    g /= g.sum()
    kernel = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    out = []
    for ch in range(3):
        a, b = x[..., ch], y[..., ch]

        def f(v):
            return ndimage.correlate(v, kernel, mode="mirror")  # mirror == torch "reflect"

        mu_a, mu_b = f(a), f(b)
        var_a = np.maximum(f(a * a) - mu_a**2, 0)
        var_b = np.maximum(f(b * b) - mu_b**2, 0)
        cov = f(a * b) - mu_a * mu_b
        out.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2))
                   / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(out))


def test_pie_metrics_follow_the_benchmark_arithmetic():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    edit = np.zeros((48, 64), bool)
    edit[10:30, 20:50] = True
    b[edit] = 0  # the edit itself must not count
    za, zb = (x / 255.0 * (1 - edit[..., None]) for x in (a, b))
    mse = float(((za - zb) ** 2).mean())
    found = pie_background(a, b, edit)
    assert abs(found["pie_mse"] - mse) < 1e-5
    assert abs(found["pie_psnr"] - 10 * math.log10(1 / mse)) < 1e-5
    assert abs(pie_ssim(a, b, edit) - reference_ssim(za, zb)) < 1e-5
    # only the unedited part counts: changing the edit region changes nothing
    c = b.copy()
    c[edit] = 255
    assert pie_background(a, c, edit) == found


# -- end to end -----------------------------------------------------------------------------------
def test_ingested_pie_bench_through_the_batch_with_tiny(tmp_path):
    from lregions_core import batch
    from lregions_core.config import make_config
    from lregions_core.index import table
    from lregions_core.report import write_report
    from lregions_core.store import Store

    source, _ = make_pie(tmp_path / "pie", n=2)
    manifest = tmp_path / "pie.csv"
    ingest("pie-bench", source, manifest, limit=2)
    rows = read_manifest(manifest)
    config = make_config("tiny")
    store = Store(str(tmp_path / "run"))
    states = batch.run_all([batch.new_state(r) for r in rows], config, store)
    assert [s["status"] for s in states] == ["ok", "ok"], [s.get("error") for s in states]
    frame = table(states, config).to_pandas()
    assert list(frame["ground_truth"]) == ["target_mask"] * 2
    assert list(frame["object_mask"]) == ["target_mask"] * 2
    for name in ("pie_mse", "pie_psnr", "pie_ssim", "pie_lpips", "pie_clip_whole",
                 "pie_clip_edited", "bg_mse", "box_iou"):
        assert frame[name].notna().all(), (name, frame["metrics_missing"][0])
    assert ((frame["pie_clip_whole"] >= 0) & (frame["pie_clip_whole"] <= 100)).all()
    metrics = json.loads((tmp_path / "run" / "items" / rows[0].id / "metrics.json").read_text())
    assert metrics["ground_truth"] == "target_mask"
    # the stored pie_mse is the benchmark's arithmetic on the stored input and final image
    item = tmp_path / "run" / "items" / rows[0].id
    result = json.loads((item / "result.json").read_text())
    a = np.asarray(Image.open(item / result["input"]).convert("RGB"))
    b = np.asarray(Image.open(item / "final.png").convert("RGB"))
    edit = np.asarray(Image.open(rows[0].target_mask)) == 255
    za, zb = (x / 255.0 * (1 - edit[..., None]) for x in (a, b))
    assert abs(metrics["metrics"]["pie_mse"] - float(((za - zb) ** 2).mean())) < 1e-5
    # the report says which ground truth the metrics used
    pq.write_table(table(states, config), tmp_path / "run" / "index.parquet")
    page = Path(write_report(str(tmp_path / "run"))).read_text()
    assert "target_mask: 2" in page


def test_target_mask_is_the_background_ground_truth_and_the_object_mask():
    from lregions_core.config import make_config
    from lregions_core.metrics import Evaluator, masked_mse

    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    b = a.copy()
    b[5:20, 10:30] = 0  # the edit
    b[30:, :] //= 2  # damage outside it
    edit = np.zeros((40, 48), bool)
    edit[4:22, 8:32] = True
    out = Evaluator(make_config("tiny")).evaluate(
        Image.fromarray(a), Image.fromarray(b), prompt="a black box", source_prompt="a photo",
        box=(0, 0, 48, 20), target_box=(8, 4, 32, 22), target_mask=edit)
    assert out["ground_truth"] == "target_mask"
    assert out["metrics"]["bg_mse"] == pytest.approx(masked_mse(a, b, ~edit))
    assert out["metrics"]["box_iou"] is not None  # target_box still judges the box
    assert out["metrics"]["pie_mse"] == pie_background(a, b, edit)["pie_mse"]
    for name in ("pie_lpips", "pie_clip_whole", "pie_clip_edited"):
        assert out["metrics"][name] is not None, out["missing"].get(name)
    without = Evaluator(make_config("tiny")).evaluate(
        Image.fromarray(a), Image.fromarray(b), prompt="x", source_prompt=None, box=(0, 0, 9, 9))
    assert without["ground_truth"] is None
    assert "no target_mask" in without["missing"]["pie_psnr"]
