"""Output folders on S3, against a real S3 API server on 127.0.0.1 (moto's server mode, with s3fs
as the client): a batch, a rerun that reuses everything, a SIGKILLed batch that resumes, and the
report. The server records every request, so the tests can check that each file is written with
one PUT and never as a temporary object moved (copied) into place."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import render_in_chromium
from resume_helpers import kill_at
from servers import moto_recorder

from lregions_core.index import read_index
from lregions_core.store import Store

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "manifests" / "demo.csv"
ORACLE = ROOT / "manifests" / "oracle.csv"


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def _recorded(endpoint: str, run) -> list[dict]:
    """The S3 requests made while ``run()`` ran."""
    moto_recorder(endpoint, "reset")
    moto_recorder(endpoint, "start")
    try:
        run()
    finally:
        moto_recorder(endpoint, "stop")
    return moto_recorder(endpoint, "download")


def _writes(requests: list[dict], prefix: str) -> Counter:
    """Object keys under ``prefix`` written, with how many PUTs each (multipart parts aside;
    the output folder's lease, whose heartbeat rewrites it every few seconds, aside)."""
    from lregions_core.lease import LOCK

    counts: Counter = Counter()
    for r in requests:
        url = urlsplit(r["url"])
        if (r["method"] == "PUT" and url.path.startswith(prefix) and "partNumber" not in url.query
                and not url.path.endswith(f"/{LOCK}")):
            counts[url.path] += 1
    return counts


def _copies(requests: list[dict]) -> list[str]:
    return [r["url"] for r in requests
            if any(k.lower() == "x-amz-copy-source" for k in (r.get("headers") or {}))]


def _run(*args: str) -> int:
    from flows.cli import main

    return main(["edit", *args])


def test_batch_on_s3_then_rerun_reuses_everything(prefect_server, s3_server, tmp_path):
    fs = _fs(s3_server)
    fs.mkdir("lregions-demo")
    url = "s3://lregions-demo/demo"
    args = [str(DEMO), "--out", url, "--preset", "tiny"]
    codes = []
    first = _recorded(s3_server, lambda: codes.append(_run(*args)))
    assert codes == [0]
    written = _writes(first, "/lregions-demo/demo/")
    assert written and max(written.values()) == 1, written.most_common(3)  # each file: one PUT
    assert _copies(first) == []  # nothing written aside and moved into place
    assert not [k for k in fs.find("lregions-demo") if k.endswith(".tmp")]
    assert not fs.exists("lregions-demo/demo/index-parts")

    store = Store(url)
    table = store.read_parquet("index.parquet")
    assert list(table["status"]) == ["ok"] * 4
    for item_id in table["id"]:
        result = store.read_json(f"items/{item_id}/result.json")
        refs = [result["input"]] + [c["image"] for c in result["candidates"]]
        for ref in refs:  # every reference resolves to an object that exists
            assert store.exists(f"items/{item_id}/{ref}"), ref

    # the report was written to the bucket; a copy of the folder opens with every image
    local = tmp_path / "copy"
    fs.get("lregions-demo/demo/", str(local), recursive=True)
    images, _, _ = render_in_chromium(local / "report.html", tmp_path / "s3-report.png")
    assert len(images) > 4 * 11 and all(i["ok"] for i in images)

    codes.clear()
    again = _recorded(s3_server, lambda: codes.append(_run(*args)))
    assert codes == [0]
    assert store.read_parquet("index.parquet")["reused"].all()
    rewritten = [k for k in _writes(again, "/lregions-demo/demo/")
                 if "/items/" in k or "/cache/" in k]
    assert rewritten == []  # a rerun writes no item and no cached result again


def test_killed_batch_on_s3_resumes(prefect_server, s3_server, tmp_path):
    fs = _fs(s3_server)
    fs.mkdir("lregions-kill")
    url = "s3://lregions-kill/oracle"
    args = [str(ORACLE), "--out", url, "--preset", "oracle", "--chunk-size", "4"]
    kill_at("mid-chunk", args, tmp_path / "marker")

    store = Store(url)
    survivors = {Path(k).parent.name for k in fs.find("lregions-kill/oracle/items")
                 if k.endswith("/result.json")}
    partial = read_index(store)
    assert 1 <= len(partial) < len(survivors)  # mid-chunk: finished items not indexed yet
    for row in partial.itertuples():  # the partial index lists only complete items
        assert row.status == "ok" and store.exists(f"items/{row.id}/result.json")
        store.read_png(row.final_path)

    codes = []
    resumed = _recorded(s3_server, lambda: codes.append(_run(*args)))
    assert codes == [0]
    table = store.read_parquet("index.parquet")
    total = len(ORACLE.read_text().splitlines()) - 1
    assert len(table) == total and (table["status"] == "ok").all()
    # resumed: rows of the killed run's parts carried over, its other finished items reused
    assert survivors - set(partial["id"]) <= set(table.loc[table["reused"], "id"])
    # No finished item's edit written again (metrics.json may be new: the kill came before the
    # evaluate stage of some of them).
    rewritten = {k.split("/items/")[1].split("/")[0]
                 for k in _writes(resumed, "/lregions-kill/oracle/items/")
                 if k.endswith(("/result.json", "/final.png", "/overlay.png"))}
    assert not rewritten & survivors
    assert not fs.exists("lregions-kill/oracle/index-parts")


def test_store_writes_once_on_object_stores_and_aside_on_disks(s3_server, tmp_path):
    assert Store("s3://bucket/out").atomic_put and Store("memory://x/out").atomic_put
    local = Store(str(tmp_path))
    assert not local.atomic_put
    with pytest.raises(RuntimeError), local.open_write("a/b.bin") as handle:
        handle.write(b"half")
        raise RuntimeError("crash while writing")
    assert not local.exists("a/b.bin") and local.listdir("a") == []  # nothing left behind
    fs = _fs(s3_server)
    fs.mkdir("lregions-abort")
    remote = Store("s3://lregions-abort/out")
    with pytest.raises(RuntimeError), remote.open_write("big.bin") as handle:
        handle.write(b"x" * (6 * 2**20))  # past one multipart part
        raise RuntimeError("crash while uploading")
    assert not remote.exists("big.bin")  # the upload was aborted, not published
