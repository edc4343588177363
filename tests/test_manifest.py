"""Manifest reading: file-level usage errors, row-level errors, path resolution and stable ids."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from lregions_core.manifest import ManifestError, ManifestRow, read_manifest, safe_item_dir


def write(folder: Path, text: str, name: str = "m.csv", images: tuple[str, ...] = ()) -> Path:
    """A manifest ``name`` in ``folder`` plus empty placeholder files for ``images``."""
    folder.mkdir(parents=True, exist_ok=True)
    for img in images:
        (folder / img).parent.mkdir(parents=True, exist_ok=True)
        (folder / img).write_bytes(b"not decoded here")
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def by_row(rows: list[ManifestRow]) -> dict[int, ManifestRow]:
    return {r.row: r for r in rows}


# --- file-level usage errors -------------------------------------------------------------------


def test_bom_and_header_normalisation(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeff Image ,PROMPT\na.png,a cat\n".encode())
    (tmp_path / "a.png").write_bytes(b"x")
    [row] = read_manifest(path)
    assert row.error is None
    assert row.image == str(tmp_path / "a.png")
    assert row.prompt == "a cat"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty file"),
        (b"\n\n  \n", "empty file"),
        (b"image,prompt\n", "no data rows"),
        (b"image,prompt\n\n,\n", "no data rows"),
        (b"image,prompt\n\xff\xfe.png,x\n", "not UTF-8"),
        (b"image,prompt\na.png,x\x00y\n", "NUL"),
        (b'image,prompt\na.png,"unterminated\n', "not parseable as CSV"),
        (b"image,prompt,Image\na.png,x,b.png\n", "duplicate column names: image"),
    ],
)
def test_file_level_errors(tmp_path, content, needle):
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_required_column_lists_missing_and_found(tmp_path):
    path = write(tmp_path, "img,prompt,seed\na.png,x,1\n")
    with pytest.raises(ManifestError, match=r"missing required column\(s\) image; found") as info:
        read_manifest(path)
    assert "'img'" in str(info.value) and "'seed'" in str(info.value)
    with pytest.raises(ManifestError, match="image, prompt"):
        read_manifest(write(tmp_path, "a,b\n1,2\n", name="n.csv"))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ManifestError, match="file not found") as info:
        read_manifest(tmp_path / "nope.csv")
    assert "nope.csv" in str(info.value)
    with pytest.raises(ManifestError, match="is a directory"):
        read_manifest(tmp_path)


def test_manifest_error_is_value_error_and_pickles():
    err = pickle.loads(pickle.dumps(ManifestError("/x/m.csv", "empty file")))
    assert isinstance(err, ValueError)
    assert (err.path, err.problem, str(err)) == ("/x/m.csv", "empty file", str(err))
    assert "/x/m.csv" in str(err) and "empty file" in str(err)


# --- image resolution --------------------------------------------------------------------------


def test_relative_image_resolves_against_manifest_folder_not_cwd(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "imgs").mkdir()
    (elsewhere / "imgs" / "a.png").write_bytes(b"decoy in the cwd")
    path = write(
        tmp_path / "proj",
        "image,prompt\nimgs/a.png,x\n./imgs/../b.png,y\n",
        images=("imgs/a.png", "b.png"),
    )
    monkeypatch.chdir(elsewhere)
    a, b = read_manifest(os.path.relpath(path, elsewhere))
    assert a.image == str(tmp_path / "proj" / "imgs" / "a.png")
    assert b.image == str(tmp_path / "proj" / "b.png")
    assert a.error is None and b.error is None


def test_absolute_url_and_skimage_images(tmp_path):
    (tmp_path / "abs.png").write_bytes(b"x")
    text = (
        "image,prompt\n"
        f"{tmp_path / 'abs.png'},a\n"
        "s3://bucket/x.png,b\n"
        "memory://y.png,c\n"
        "skimage:chelsea,d\n"
        "skimage:no_such_photo,e\n"
        "skimage:download_all,f\n"
    )
    rows = by_row(read_manifest(write(tmp_path / "m", text)))
    assert rows[1].image == str(tmp_path / "abs.png") and rows[1].error is None
    assert rows[2].image == "s3://bucket/x.png" and rows[2].error is None  # not checked here
    assert rows[3].image == "memory://y.png" and rows[3].error is None
    assert rows[4].image == "skimage:chelsea" and rows[4].error is None
    assert "unknown scikit-image sample 'no_such_photo'" in rows[5].error
    assert "unknown scikit-image sample" in rows[6].error


def test_manifest_on_fsspec_url_resolves_relative_images_there():
    fs = fsspec.filesystem("memory")
    with fs.open("/lr-test/jobs/m.csv", "wb") as f:
        f.write(b"image,prompt\npics/a.png,x\n../b.png,y\n")
    try:
        a, b = read_manifest("memory:///lr-test/jobs/m.csv")
    finally:
        fs.rm("/lr-test", recursive=True)
    assert a.image == "memory:///lr-test/jobs/pics/a.png" and a.error is None
    assert b.image == "memory:///lr-test/b.png" and b.error is None


# --- row-level errors --------------------------------------------------------------------------


def test_row_errors_leave_other_rows_valid(tmp_path):
    text = (
        "image,prompt,seed,target_box,id\n"
        "ok.png,fine,,,\n"  # 1
        "ok.png,,,,\n"  # 2
        "missing.png,x,,,\n"  # 3
        ",x,,,\n"  # 4
        "ok.png,x,abc,,\n"  # 5
        'ok.png,x,,"1,2,3",\n'  # 6
        "ok.png,x,,,../x\n"  # 7
        "ok.png,x,,,a\n"  # 8
        "ok.png,y,,,a\n"  # 9
        "sub,x,,,\n"  # 10: a folder
        "ok.png,x,,,b,surplus\n"  # 11
        "ok.png,last,,,\n"  # 12
    )
    rows = by_row(read_manifest(write(tmp_path, text, images=("ok.png", "sub/f.png"))))
    assert [r for r, row in rows.items() if row.error is None] == [1, 8, 12]
    assert rows[2].error == "empty prompt"
    assert rows[3].error == f"image not found: {tmp_path / 'missing.png'}"
    assert rows[4].error == "empty image"
    assert rows[5].error.startswith("seed must be an integer") and "'abc'" in rows[5].error
    assert rows[6].error.startswith("target_box must be x0,y0,x1,y1") and "'1,2,3'" in rows[6].error
    assert rows[7].error.startswith("unsafe id '../x': ids may contain only letters")
    assert rows[9].error == "duplicate id 'a' (also row 8)"
    assert rows[10].error == f"image is a directory: {tmp_path / 'sub'}"
    assert rows[11].error == "row has 6 fields but the header has 5"


def test_several_problems_in_one_row_are_all_reported(tmp_path):
    [row] = read_manifest(write(tmp_path, "image,prompt,seed\nnope.png,,x\n"))
    assert "image not found" in row.error
    assert "empty prompt" in row.error
    assert "seed must be an integer" in row.error


def test_row_numbers_count_data_rows_and_blank_rows_are_skipped(tmp_path):
    text = 'image,prompt\n\na.png,"two\nlines"\n,\na.png,z\n'
    rows = read_manifest(write(tmp_path, text, images=("a.png",)))
    assert [r.row for r in rows] == [2, 4]
    assert rows[0].prompt == "two\nlines"


def test_values_stay_strings_and_are_stripped(tmp_path):
    text = "image,prompt,source,id\n a.png , NA , NULL , 001 \na.png,nan,,\n"
    a, b = read_manifest(write(tmp_path, text, images=("a.png",)))
    assert (a.prompt, a.source, a.id, a.error) == ("NA", "NULL", "001", None)
    assert (b.prompt, b.source, b.error) == ("nan", None, None)


# --- seed and target_box -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "seed"),
    [("", None), ("0", 0), (" 42 ", 42), ("+7", 7), ("007", 7), (str(2**63 - 1), 2**63 - 1)],
)
def test_seed_valid(tmp_path, cell, seed):
    [row] = read_manifest(
        write(tmp_path, f"image,prompt,seed\na.png,x,{cell}\n", images=("a.png",))
    )
    assert row.error is None
    assert row.seed == seed


@pytest.mark.parametrize("cell", ["x", "1.5", "1e3", "-1", str(2**63), "1 2"])
def test_seed_invalid(tmp_path, cell):
    [row] = read_manifest(
        write(tmp_path, f"image,prompt,seed\na.png,x,{cell}\n", images=("a.png",))
    )
    assert row.seed is None
    assert row.error == f"seed must be an integer from 0 to {2**63 - 1}, got {cell!r}"


@pytest.mark.parametrize(
    ("cell", "box"),
    [("", None), ("0,0,10,20", (0, 0, 10, 20)), (" 1 , 2 ,3,  4 ", (1, 2, 3, 4))],
)
def test_target_box_valid(tmp_path, cell, box):
    text = f'image,prompt,target_box\na.png,x,"{cell}"\n'
    [row] = read_manifest(write(tmp_path, text, images=("a.png",)))
    assert row.error is None
    assert row.target_box == box


@pytest.mark.parametrize(
    "cell",
    [
        "-1,0,10,10",
        "10,0,5,10",
        "0,10,10,5",
        "0,0,0,10",
        "1,2,3",
        "1,2,3,4,5",
        "a,b,c,d",
        "1.5,0,10,10",
        "(0,0,10,10)",
    ],
)
def test_target_box_invalid(tmp_path, cell):
    text = f'image,prompt,target_box\na.png,x,"{cell}"\n'
    [row] = read_manifest(write(tmp_path, text, images=("a.png",)))
    assert row.target_box is None
    assert row.error == f"target_box must be x0,y0,x1,y1 with x0<x1, y0<y1, got {cell!r}"


# --- ids ---------------------------------------------------------------------------------------


def test_derived_id_is_stable_and_independent_of_location(tmp_path):
    text = "image,prompt,seed\nimgs/My Cat Photo.PNG,a dog,3\nimgs/My Cat Photo.PNG,a cow,3\n"
    first = write(tmp_path / "a", text, images=("imgs/My Cat Photo.PNG",))
    ids1 = [r.id for r in read_manifest(first)]
    ids2 = [r.id for r in read_manifest(first)]
    shutil.copytree(tmp_path / "a", tmp_path / "moved" / "deeper")
    ids3 = [r.id for r in read_manifest(tmp_path / "moved" / "deeper" / "m.csv")]
    assert ids1 == ids2 == ids3
    assert ids1[0] != ids1[1]  # the prompt differs
    assert ids1[0].startswith("my-cat-photo-")
    assert len(ids1[0]) == len("my-cat-photo-") + 10


def test_derived_id_depends_on_every_content_field(tmp_path):
    rows = [
        "a.png,x,,,",
        "a.png,x,src,,",
        "a.png,x,,1,",
        'a.png,x,,,"0,0,1,1"',
        "a.png,y,,,",
        " a.png , x ,,,",  # same as row 1 after stripping
        "a.png,x,, 01 ,",  # same seed as row 3
        'a.png,x,,,"0, 0, 1, 1"',  # same box as row 4
    ]
    text = "image,prompt,source,seed,target_box\n" + "\n".join(rows) + "\n"
    got = by_row(read_manifest(write(tmp_path, text, images=("a.png",))))
    assert len({got[i].id for i in range(1, 6)}) == 5
    assert all(got[i].error is None for i in range(1, 6))
    for dup, orig in ((6, 1), (7, 3), (8, 4)):
        assert got[dup].id == got[orig].id
        assert got[dup].error == f"duplicate id {got[orig].id!r} (also row {orig})"


def test_derived_id_without_usable_stem_is_just_the_hash(tmp_path):
    [row, sk] = read_manifest(
        write(tmp_path, "image,prompt\n日本.png,x\nskimage:chelsea,x\n", images=("日本.png",))
    )
    assert len(row.id) == 10 and all(c in "0123456789abcdef" for c in row.id)
    assert sk.id.startswith("chelsea-")


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "a\\b", ".hidden", "x..y", "..", "a b", "é", "x" * 101, "a:b"]
)
def test_unsafe_explicit_ids_are_rejected(tmp_path, bad):
    text = f'image,prompt,id\na.png,x,"{bad}"\na.png,y,fine\n'
    bad_row, good = read_manifest(write(tmp_path, text, images=("a.png",)))
    assert bad_row.error == (
        f"unsafe id {bad!r}: ids may contain only letters, digits, '.', '_' and '-', "
        "must not start with '.', at most 100 characters"
    )
    assert good.error is None and good.id == "fine"


@pytest.mark.parametrize("good", ["a", "A-1_b.c", "-x", "_", "x" * 100, "v1.2"])
def test_safe_explicit_ids_are_accepted(tmp_path, good):
    [row] = read_manifest(write(tmp_path, f"image,prompt,id\na.png,x,{good}\n", images=("a.png",)))
    assert row.error is None and row.id == good


def test_duplicate_ids_first_stays_valid_and_case_is_ignored(tmp_path):
    text = "image,prompt,id\na.png,x,job\na.png,y,JOB\na.png,z,job\na.png,w,other\n"
    rows = read_manifest(write(tmp_path, text, images=("a.png",)))
    assert [r.error for r in rows] == [
        None,
        "duplicate id 'JOB' (also row 1)",
        "duplicate id 'job' (also row 1)",
        None,
    ]


def test_to_record_is_json_ready(tmp_path):
    text = 'image,prompt,source,seed,target_box,id\na.png,x,y,5,"0,0,2,2",r1\n'
    [row] = read_manifest(write(tmp_path, text, images=("a.png",)))
    rec = json.loads(json.dumps(row.to_record()))
    assert rec == {
        "row": 1,
        "id": "r1",
        "image": str(tmp_path / "a.png"),
        "prompt": "x",
        "source": "y",
        "seed": 5,
        "target_box": [0, 0, 2, 2],
        "error": None,
    }


# --- safe_item_dir -----------------------------------------------------------------------------


def test_safe_item_dir_accepts_good_ids(tmp_path):
    assert safe_item_dir(str(tmp_path), "job-1") == os.path.join(str(tmp_path), "job-1")
    assert safe_item_dir("s3://bucket/out/", "job-1") == "s3://bucket/out/job-1"
    assert safe_item_dir("memory://out", "a.b") == "memory://out/a.b"


@pytest.mark.parametrize(
    "bad", ["..", ".", "", "../x", "a/../../x", "/etc", "a/b", "a\\b", ".hidden", "x\n", "x..y"]
)
def test_safe_item_dir_rejects_escapes(tmp_path, bad):
    with pytest.raises(ValueError):
        safe_item_dir(str(tmp_path), bad)
    with pytest.raises(ValueError):
        safe_item_dir("s3://bucket/out", bad)


def test_safe_item_dir_rejects_symlink_out_of_the_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "out" / "link")
    with pytest.raises(ValueError, match="escapes"):
        safe_item_dir(str(tmp_path / "out"), "link")


def test_core_module_does_not_import_prefect():
    code = "import sys, lregions_core.manifest; sys.exit('prefect' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
