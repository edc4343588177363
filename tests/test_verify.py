"""A damaged batch output folder: what a rerun trusts (an item only when every file its
result.json names is there; a cached stage result only when it can be read), and ``lregions
verify OUT [--repair]``, which decodes every file and makes the next run redo exactly the damaged
items. One small real batch (tiny preset, offline, CPU) is made once and copied per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from PIL import Image

from lregions_core import index
from lregions_core.batch import new_state, run_all
from lregions_core.cli import main as library_cli
from lregions_core.config import run_config
from lregions_core.manifest import read_manifest
from lregions_core.stages import load_features, prune_candidates
from lregions_core.store import Store

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT / "manifests" / "oracle.csv"
COUNT = 8  # rows of the oracle manifest in the batch
CONFIG = run_config("tiny")  # what `lregions edit MANIFEST --preset tiny` runs with
DAMAGED = ["item000", "item001", "item002", "item003", "item004"]  # see damage()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """The first rows of the oracle manifest, with image paths made absolute."""
    table = pd.read_csv(ORACLE).head(COUNT)
    table["image"] = [str(ORACLE.parent / image) for image in table["image"]]
    path = tmp_path_factory.mktemp("manifest") / "rows.csv"
    table.to_csv(path, index=False)
    return path


def run_batch(out: Path, manifest: Path, config=CONFIG) -> pd.DataFrame:
    """What ``lregions edit MANIFEST --out OUT`` does for one chunk, without Prefect: every stage
    over every row, then the index (one part, merged). Returns the index."""
    rows = read_manifest(str(manifest))
    store = Store(str(out))
    run_id, _ = index.begin_run(store, "", index.fingerprint(rows, config))
    states = run_all([new_state(row) for row in rows], config, store)
    index.write_part(store, "", run_id, "000000", states, config)
    index.merge(store, "", run_id)
    return index.read_index(store).set_index("id")


@pytest.fixture(scope="module")
def whole(tmp_path_factory, manifest) -> Path:
    out = tmp_path_factory.mktemp("batch") / "out"
    table = run_batch(out, manifest)
    assert (table["status"] == "ok").all(), table["error"].tolist()
    return out


@pytest.fixture
def out(whole, tmp_path) -> Path:
    """A fresh copy of the whole batch folder."""
    return Path(shutil.copytree(whole, tmp_path / "out"))


def result_of(out: Path, item: str) -> dict:
    return json.loads((out / "items" / item / "result.json").read_text())


def truncate(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.as_posix()


def features_files(out: Path, item: str) -> list[Path]:
    """The feature files of the item's input image (one per feature model's settings)."""
    image_hash = Path(result_of(out, item)["input"]).stem
    return list((out / "cache" / "features").glob(f"{image_hash}-*.parquet"))


def features_file(out: Path, item: str) -> Path:
    (found,) = features_files(out, item)
    return found


def candidate(out: Path, item: str, index: int) -> Path:
    return out / result_of(out, item)["regions_path"] / f"cand_{index:02d}.png"


def damage(out: Path) -> dict[str, str]:
    """Damage the folder as a bad copy or a full disk might: garbage result.json (item000),
    deleted final.png (item001) and layer.png (item002), three truncated candidate images
    (item003, item004) and two truncated feature files (item005, item006; no item names
    them). Returns each damaged file, relative to ``out``, and the word verify must say."""
    (out / "items/item000/result.json").write_text("{garbage")
    (out / "items/item001/final.png").unlink()
    (out / "items/item002/layer.png").unlink()
    for path in (candidate(out, "item003", 0), candidate(out, "item004", 0),
                 candidate(out, "item004", 1), features_file(out, "item005"),
                 features_file(out, "item006")):
        truncate(path)
    found = {"items/item000/result.json": "cannot read", "items/item001/final.png": "missing",
             "items/item002/layer.png": "missing"}
    for item, i in (("item003", 0), ("item004", 0), ("item004", 1)):
        found[candidate(out, item, i).relative_to(out).as_posix()] = "cannot read"
    for item in ("item005", "item006"):
        found[features_file(out, item).relative_to(out).as_posix()] = "cannot read"
    return found


def verify(out: Path | str, capsys, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    status = library_cli(["verify", str(out), *flags])
    return status, capsys.readouterr().out


def files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def decodes(path: Path) -> bool:
    with Image.open(path) as image:
        image.load()
    return True


# -- verify ------------------------------------------------------------------------------------
def test_verify_a_whole_folder_exits_0(whole, capsys):
    status, text = verify(whole, capsys)
    assert status == 0, text
    assert len(text.strip().splitlines()) == 1  # the summary alone
    assert text.startswith(f"all whole: {COUNT} items")
    status, text = verify(whole, capsys, "--json")
    found = json.loads(text)
    assert status == 0 and found["ok"] and found["damage"] == [] and found["items"] == COUNT
    # every item's final, overlay, layer, input, 9ish candidates, candidates.json, metrics.json
    assert found["files"] > COUNT * 12


def test_verify_names_each_damaged_file_and_exits_1(out, capsys):
    expected = damage(out)
    status, text = verify(out, capsys)
    assert status == 1, text
    said = dict(line.split(": ", 1) for line in text.strip().splitlines()[:-1])
    assert set(said) == set(expected), text
    for path, word in expected.items():
        assert said[path].startswith(word), (path, said[path])
    # a truncated file's reason is the decoder's, short
    assert all(len(said[p]) < 200 for p in expected)
    assert "item003" in said[candidate(out, "item003", 0).relative_to(out).as_posix()]
    assert text.strip().splitlines()[-1].startswith(f"{len(expected)} damaged")
    status, text = verify(out, capsys, "--json")
    found = json.loads(text)
    assert status == 1 and not found["ok"] and found["removed"] is None
    assert found["damaged_items"] == DAMAGED  # feature files damage no item
    assert {d["path"] for d in found["damage"]} == set(expected)


def test_verify_names_index_rows_and_results_that_do_not_match(out, capsys):
    shutil.rmtree(out / "items" / "item007")  # the index still lists it as ok
    shutil.copy(out / "items/item005/result.json", out / "items/item006/result.json")
    (out / "items/item004/metrics.json").write_text("[1, 2")
    (out / index.PARTS / "run=20260101T000000Z-abcdef").mkdir(parents=True)  # a run killed early
    before = files(out)
    status, text = verify(out, capsys, "--repair")
    assert status == 1, text
    assert "note: index-parts/ holds the index parts of a run that did not end" in text
    said = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert said["items/item007"].startswith("missing (the index lists the item as ok)")
    assert said["items/item006/result.json"].startswith("belongs to item 'item005'")
    assert said["items/item004/metrics.json"].startswith("cannot read: JSONDecodeError")
    # The repair removed the foreign result.json (item006 is redone) and the unreadable
    # metrics.json (the evaluate stage writes it again; item004's edit is whole): nothing else.
    assert before - files(out) == {"items/item006/result.json", "items/item004/metrics.json"}
    assert "removed items/item006/result.json" in text


def test_repair_never_follows_a_result_json_out_of_the_item_and_the_caches(out, capsys):
    """result.json is data from disk: a reference to a folder, to the index parts or outside the
    output folder is reported, and repair removes nothing but that result.json."""
    outside = out.parent / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    for item, ref in (("item001", "../../../outside.png"), ("item002", ".."),
                      ("item003", "../../index.parquet")):
        result = result_of(out, item)
        result["input"] = ref
        (out / "items" / item / "result.json").write_text(json.dumps(result))
    before = files(out)
    status, text = verify(out, capsys, "--repair")
    said = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert status == 1, text
    assert "outside the output folder" in said["items/item001/result.json"]
    assert said["items/item002/result.json"].startswith("not an item's result")
    assert said["items/item003/result.json"].startswith("not an item's result")
    assert before - files(out) == {"items/item002/result.json", "items/item003/result.json"}
    assert outside.is_file() and (out / "items").is_dir() and (out / "index.parquet").is_file()


def test_verify_without_an_index_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "items").mkdir()
    status = library_cli(["verify", str(tmp_path)])
    assert status == 2
    assert "no index.parquet" in capsys.readouterr().err


def test_verify_reads_fsspec_urls(whole, capsys):
    fs = fsspec.filesystem("memory")
    fs.put(str(whole), "/verify-url", recursive=True)
    try:
        assert verify("memory://verify-url", capsys)[0] == 0
        fs.pipe_file("/verify-url/items/item003/overlay.png", b"\x89PNG\r\n")
        status, text = verify("memory://verify-url", capsys, "--repair")
        assert status == 1 and "items/item003/overlay.png: cannot read" in text
        assert not fs.exists("/verify-url/items/item003/overlay.png")
        assert not fs.exists("/verify-url/items/item003/result.json")
        assert fs.exists("/verify-url/items/item003/final.png")
    finally:
        fs.rm("/verify-url", recursive=True)


def test_the_lregions_command_has_verify(whole, capsys):
    from flows.cli import main

    capsys.readouterr()
    assert main(["verify", str(whole)]) == 0
    assert capsys.readouterr().out.startswith("all whole")


# -- reruns ------------------------------------------------------------------------------------
def test_rerun_redoes_items_whose_files_are_gone(prefect_server, out, manifest, capsys):
    """``lregions edit`` again, without --repair: items whose result.json cannot be read or
    names a file that is gone are redone; truncated files are not decoded by a rerun (verify
    finds them)."""
    from flows.cli import main

    expected = damage(out)
    assert main(["edit", str(manifest), "--out", str(out), "--preset", "tiny"]) == 0
    table = pd.read_parquet(out / "index.parquet").set_index("id")
    assert (table["status"] == "ok").all(), table["error"].tolist()
    redone = ["item000", "item001", "item002"]
    assert not table.loc[redone, "reused"].any()
    assert table.drop(redone)["reused"].all()
    assert decodes(out / "items/item001/final.png")
    assert decodes(out / "items/item002/layer.png")
    assert result_of(out, "item000")["id"] == "item000"
    status, text = verify(out, capsys)
    said = {line.split(": ", 1)[0] for line in text.strip().splitlines()[:-1]}
    assert status == 1 and said == {p for p in expected if p.startswith("cache/")}, text


def test_repair_then_rerun_redoes_exactly_the_damaged_items(out, manifest, capsys):
    expected = damage(out)
    before = files(out)
    status, text = verify(out, capsys, "--repair")
    assert status == 1
    removed = before - files(out)
    # the damaged items' result.json and the damaged files that were there: nothing else
    gone = {"items/item001/final.png", "items/item002/layer.png"}
    assert removed == {f"items/{i}/result.json" for i in DAMAGED} | set(expected) - gone
    assert {line.removeprefix("removed ") for line in text.splitlines()
            if line.startswith("removed ") and "files" not in line} == removed
    kept = {p: (out / p).stat().st_mtime_ns for p in files(out) if p.startswith("items/")
            and p.split("/")[1] not in DAMAGED}

    table = run_batch(out, manifest)
    assert (table["status"] == "ok").all(), table["error"].tolist()
    assert not table.loc[DAMAGED, "reused"].any()
    assert table.drop(DAMAGED)["reused"].all()
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept  # untouched
    status, text = verify(out, capsys)
    assert status == 0, text
    # the feature files were not needed (no item's regions were recomputed): still gone
    assert not features_files(out, "item005")


@pytest.mark.parametrize("undo", ["final.png", "result.json"])
def test_a_redone_item_recomputes_unreadable_cached_stage_results(out, manifest, capsys, undo):
    """An item redone (its ``undo`` file deleted) over a truncated cached stage result (feature
    file, chosen candidate, candidates.json) computes that result again instead of failing the
    row on every rerun."""
    features = features_file(out, "item000")
    truncate(features)
    candidate(out, "item000", 1).unlink()  # its regions must be computed again: reads features
    chosen = result_of(out, "item001")["chosen"]
    truncate(candidate(out, "item001", chosen))
    summary = out / result_of(out, "item002")["regions_path"] / "candidates.json"
    truncate(summary)
    for item in ("item000", "item001", "item002"):
        (out / "items" / item / undo).unlink()

    table = run_batch(out, manifest)
    assert (table["status"] == "ok").all(), table["error"].tolist()
    assert not table.loc[["item000", "item001", "item002"], "reused"].any()
    assert load_features(Store(str(out)), features.relative_to(out).as_posix()).patches.size
    assert decodes(candidate(out, "item001", chosen))
    assert json.loads(summary.read_text())["candidates"]
    assert verify(out, capsys)[0] == 0


def test_pruned_candidates_do_not_make_items_redone(out, manifest, capsys):
    """With keep_candidates=chosen the others are deleted on purpose: result.json no longer
    names them, so a rerun trusts the item and verify finds it whole."""
    config = CONFIG.replace(keep_candidates="chosen")
    table = run_batch(out, manifest, config)
    assert (table["status"] == "ok").all() and not table["reused"].any()
    store = Store(str(out))
    for item in table.index:
        prune_candidates(store, result_of(out, item))
    assert len(list((out / "cache" / "regions").rglob("cand_*.png"))) == COUNT
    assert run_batch(out, manifest, config)["reused"].all()
    assert verify(out, capsys)[0] == 0


def test_repair_makes_a_resumed_run_redo_the_damaged_rows(out, manifest, capsys):
    """A run killed before its merge leaves parts that a resumed run takes for done; after
    --repair, the parts holding damaged items are not done any more (their other rows are
    reused when they run again)."""
    rows, store = read_manifest(str(manifest)), Store(str(out))
    fingerprint = index.fingerprint(rows, CONFIG)
    run_id, _ = index.begin_run(store, "", fingerprint)
    states = run_all([new_state(row) for row in rows], CONFIG, store)  # every item reused
    index.write_part(store, "", run_id, "000000", states, CONFIG)  # killed before the merge
    assert index.begin_run(store, "", fingerprint) == (run_id, {"000000"})
    damage(out)
    status, text = verify(out, capsys, "--repair")
    assert status == 1 and f"marked index-parts/run={run_id}/000000.retry.json" in text
    assert index.begin_run(store, "", fingerprint) == (run_id, set())  # the chunk runs again

    states = run_all([new_state(row) for row in rows], CONFIG, store)
    index.write_part(store, "", run_id, "000000", states, CONFIG)
    index.merge(store, "", run_id)
    table = index.read_index(store).set_index("id")
    assert (table["status"] == "ok").all() and not table.loc[DAMAGED, "reused"].any()
    assert table.drop(DAMAGED)["reused"].all()
    assert verify(out, capsys)[0] == 0


def test_items_that_share_a_regions_result_keep_each_their_candidate(out, manifest):
    """Ablation cells that differ only in the selection share the regions cache and keep
    different candidates of it (keep_candidates=chosen): pruning after one never deletes what
    the other keeps, so a rerun of either reuses every item instead of redoing it."""
    rows, store = read_manifest(str(manifest)), Store(str(out))
    cells = {"text": CONFIG.replace(keep_candidates="chosen", select_text_weight=1.0,
                                    select_image_weight=0.0, select_top_k=9),
             "image": CONFIG.replace(keep_candidates="chosen", select_text_weight=0.0,
                                     select_image_weight=1.0, select_top_k=9)}

    def run(cell: str) -> list[dict]:
        states = run_all([new_state(row) for row in rows], cells[cell], store,
                         f"cells/{cell}/items", evaluate=False)
        assert all(s["status"] == "ok" for s in states), [s["error"] for s in states]
        return states

    first = {cell: run(cell) for cell in cells}
    chosen = {cell: [s["result"]["chosen"] for s in states] for cell, states in first.items()}
    assert chosen["text"] != chosen["image"]  # the cells keep different candidates
    for states in first.values():
        for state in states:
            prune_candidates(store, state["result"])
    for cell in cells:
        assert all(s["reused"] for s in run(cell)), cell


# Holds the lease on the folder argv[1] until killed.
HOLDER = """import sys, time
from lregions_core.lease import hold
with hold(sys.argv[1], command='lregions edit (a batch)'):
    print('held', flush=True)
    time.sleep(120)
"""


def test_repair_refuses_while_a_batch_holds_the_folder(out, capsys):
    """A repair removes files: while another run holds the output folder's lease it refuses,
    naming the holder, and removes nothing."""
    import subprocess
    import sys

    damage(out)
    before = files(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        status = library_cli(["verify", str(out), "--repair"])
        said = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert status == 1 and "lregions edit (a batch)" in said, said
    assert files(out) - {"lregions.lock"} == before  # nothing removed
    # the holder died: its lease is taken over at once, and the repair goes ahead
    assert verify(out, capsys, "--repair")[0] == 1 and files(out) < before
