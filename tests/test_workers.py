"""Batches across real Prefect workers: a real ``prefect server`` (SQLite, and PostgreSQL where
Debian's package is installed), ``lregions deploy``, two ``prefect worker`` processes, and
``lregions edit --pool`` over 40 tiny-preset rows in shards of 8. One worker is killed, with its
flow run, while it runs a shard (what losing a machine does): the server's automation marks the
silent run Crashed, the coordinator runs the shard again on the live worker, and the batch ends
with every row ok and no finished item touched. Also: the usage errors and the no-worker give-up,
and the Prefect UI in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from servers import (
    client_env,
    free_port,
    kill_node,
    lregions,
    postgres,
    postgres_bin,
    prefect_server,
    start_worker,
    stop,
)

ROOT = Path(__file__).resolve().parents[1]
POOL = "lregions-test-gpu"
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]
PROMPTS = ["a red hat", "a bunch of flowers", "a small dog", "a green tree", "a blue car"]


def manifest(folder: Path, rows: int) -> Path:
    path = folder / f"m{rows}.csv"
    lines = ["image,prompt,seed"] + [
        f"skimage:{PHOTOS[i % 4]},{PROMPTS[(i // 4) % 5]},{i}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def finished_items(out: Path) -> dict[str, tuple[int, int]]:
    return {p.parent.name: (p.stat().st_mtime_ns, (p.parent / "final.png").stat().st_mtime_ns)
            for p in (out / "items").glob("*/result.json")}


def api_post(api: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_prefect_yaml_puts_shards_on_the_gpu_pool_and_coordinators_on_their_own():
    from flows.coordinator import HEARTBEAT_SECONDS
    from flows.deploy import prefect_spec
    from flows.pools import COORDINATOR_POOL, DEFAULT_POOL
    from flows.shard import SHARD_TAG

    for gpu, coordinators in ((DEFAULT_POOL, COORDINATOR_POOL), ("a100-pool", "cpu.pool")):
        spec = {d["name"]: d for d in prefect_spec(gpu, coordinators)["deployments"]}
        shard = spec[gpu]  # the shard deployment is named after its pool
        assert shard["entrypoint"] == "flows/shard.py:edit_shard"
        assert shard["work_pool"]["name"] == gpu and SHARD_TAG in shard["tags"]
        env = shard["work_pool"]["job_variables"]["env"]
        assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == HEARTBEAT_SECONDS
        coordinated = [d for d in spec.values() if d["entrypoint"].startswith("flows/coord")]
        assert {"batch-edit-nightly", "batch-edit"} == {d["name"] for d in coordinated}
        for deployment in spec.values():
            if deployment is not shard:  # nothing else waits in a GPU worker's slot
                assert deployment["work_pool"]["name"] == coordinators
        assert all(d["parameters"]["pool"] == gpu for d in coordinated)


def test_pool_names_are_checked():
    from flows.pools import check_pool_name
    from lregions_core.config import ConfigError

    assert check_pool_name("lregions-gpu.a_1") == "lregions-gpu.a_1"
    for bad in ("", "-x", "../gpu", "gpu pool", "g/p", "x" * 64):
        with pytest.raises(ConfigError, match="bad work pool name"):
            check_pool_name(bad)


def databases() -> list:
    pg = pytest.mark.skipif(postgres_bin() is None,
                            reason="PostgreSQL not installed (apt-get install postgresql)")
    return ["sqlite", pytest.param("postgresql", marks=pg)]


@pytest.mark.parametrize("database", databases())
def test_batch_across_workers_survives_a_lost_worker(tmp_path, database):
    with (postgres() if database == "postgresql" else _nothing()) as db_url, \
            prefect_server(tmp_path / "server", db_url) as api:
        env = client_env(api, tmp_path / "client")
        deployed = lregions(env, "deploy", "--pool", POOL)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        assert f"on pool '{POOL}'" in deployed.stdout

        _usage_errors(env, tmp_path)
        idle = _gives_up_without_workers(env, tmp_path)

        workers = [start_worker(env, POOL, f"w{i}", tmp_path / f"worker{i}.log")
                   for i in (1, 2)]
        out = tmp_path / "out"
        log = open(tmp_path / "coordinator.log", "w")  # noqa: SIM115
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "edit", str(manifest(tmp_path, 40)), "--out",
             str(out), "--pool", POOL, "--shard-size", "8", "--preset", "tiny"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            survivors = _kill_a_worker_mid_shard(workers[0], out, coordinator)
            killed_at = time.time()
            assert coordinator.wait(timeout=1200) == 0, (tmp_path / "coordinator.log").read_text()
            # The batch that gave up for want of workers, run again now: it resumes that batch.
            resumed = lregions(env, *idle, timeout=900)
            assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        finally:
            stop(coordinator)
            for worker in workers:
                stop(worker)
            log.close()
        said = (tmp_path / "coordinator.log").read_text()

        table = pd.read_parquet(out / "index.parquet")
        assert len(table) == 40 and (table["status"] == "ok").all(), table["error"].tolist()
        after = finished_items(out)
        assert {k: after[k] for k in survivors} == survivors  # not rewritten
        assert "Crashed" in said and "no heartbeat" in said  # the lost shard was run again
        # the command line's coordinator runs (not the nightly deployment's scheduled runs,
        # which the server creates as soon as the deployments are registered)
        names = [r["name"] for r in api_post(api, "/flow_runs/filter", {
            "flows": {"name": {"any_": ["lregions-coordinator"]}},
            "flow_runs": {"deployment_id": {"is_null_": True}}})]
        assert len(names) == 3 and len(set(names)) == 2  # the resumed batch kept its run id
        crashed = [run for run in api_post(api, "/flow_runs/filter", {"flow_runs": {"state": {
            "type": {"any_": ["CRASHED"]}}}}) if "-shard" in run["name"]]
        assert len(crashed) == 1
        noticed = datetime.fromisoformat(crashed[0]["state"]["timestamp"]).timestamp()
        assert noticed - killed_at < 240  # marked crashed within a few minutes of the loss
        if database == "sqlite":
            _prefect_ui_shows_the_batch(api, tmp_path)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _usage_errors(env: dict, tmp_path: Path) -> None:
    """Bad input is a clear message within seconds, never a hang."""
    small = manifest(tmp_path, 2)
    started = time.monotonic()
    no_deployment = lregions(env, "edit", str(small), "--out", str(tmp_path / "x"), "--pool",
                             "nobody-deployed-this", timeout=120)
    assert no_deployment.returncode == 2
    assert "has no lregions shard deployment" in no_deployment.stderr
    assert "lregions deploy --pool nobody-deployed-this" in no_deployment.stderr
    bad_name = lregions(env, "edit", str(small), "--out", str(tmp_path / "x"), "--pool",
                        "../gpu pool", timeout=120)
    assert bad_name.returncode == 2 and "bad work pool name" in bad_name.stderr
    gone = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    unreachable = lregions(gone, "edit", str(small), "--out", str(tmp_path / "x"), "--pool",
                           POOL, timeout=120)
    assert unreachable.returncode == 2 and "cannot reach the Prefect server" in unreachable.stderr
    assert time.monotonic() - started < 120  # three process starts; no waiting on anything
    assert not (tmp_path / "x").exists()


def _gives_up_without_workers(env: dict, tmp_path: Path) -> list[str]:
    """No worker online: says so, gives up after --wait-for-workers, and cancels its runs.
    Returns the command's arguments (to run it again later)."""
    args = ["edit", str(manifest(tmp_path, 2)), "--out", str(tmp_path / "idle"), "--pool", POOL,
            "--preset", "tiny"]
    started = time.monotonic()
    waited = lregions(env, *args, "--wait-for-workers", "15", timeout=300)
    said = waited.stdout + waited.stderr
    assert waited.returncode == 1, said[-3000:]
    assert "waiting for a worker of pool" in said and "no worker online in pool" in said
    assert time.monotonic() - started < 200
    assert (tmp_path / "idle" / "index-parts").is_dir()  # kept: the batch can be resumed
    return args


def _kill_a_worker_mid_shard(worker: subprocess.Popen, out: Path,
                             coordinator: subprocess.Popen) -> dict:
    """Once some items are finished and ``worker`` is running a shard, kill it and its flow
    run; returns the items finished at that moment."""
    from servers import descendants

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert coordinator.poll() is None, "the batch ended before a worker could be lost"
        busy = any("prefect" in _cmdline(pid) or "flows" in _cmdline(pid)
                   for pid in descendants(worker.pid))
        if busy and (out / "items").exists() and len(finished_items(out)) >= 2:
            time.sleep(3)  # into its shard's work
            survivors = finished_items(out)
            kill_node(worker)
            return survivors
        time.sleep(0.5)
    raise AssertionError("the worker never ran a shard")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _prefect_ui_shows_the_batch(api: str, tmp_path: Path) -> None:
    """The Prefect UI, in headless Chromium, lists the coordinator and its shard runs, and
    shows the batch's summary artifact."""
    from conftest import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} missing (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ui = api.removesuffix("/api")
    coordinators = api_post(api, "/flow_runs/filter", {"flows": {"name": {"any_": [
        "lregions-coordinator"]}}, "sort": "START_TIME_DESC"})
    done = [r for r in coordinators if r["state_type"] == "COMPLETED"]
    assert done, coordinators
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{ui}/runs/flow-run/{done[0]['id']}", wait_until="networkidle")
            page.get_by_text(done[0]["name"]).first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "ui-coordinator.png"), full_page=True)
            page.goto(f"{ui}/runs", wait_until="networkidle")
            page.get_by_text("-shard00000-try1").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "ui-runs.png"), full_page=True)
            artifacts = api_post(api, "/artifacts/filter", {"artifacts": {"key": {"any_": [
                "lregions-report", "lregions-summary"]}}})
            # the 40-row batch's summary (markdown) and the table its flow run published
            runs = {a["flow_run_id"] for a in artifacts if a["key"] == "lregions-report"
                    and "40 ok, 0 failed" in json.dumps(a["data"])}
            assert len(runs) == 1, artifacts
            ours = [a for a in artifacts if a["flow_run_id"] in runs]
            assert {a["key"] for a in ours} == {"lregions-report", "lregions-summary"}, artifacts
            for artifact in ours:
                page.goto(f"{ui}/artifacts/artifact/{artifact['id']}", wait_until="networkidle")
                expected = "40 ok, 0 failed" if artifact["key"] == "lregions-report" else "Summary"
                page.get_by_text(expected).first.wait_for(timeout=60_000)
                page.screenshot(path=str(tmp_path / f"ui-{artifact['key']}.png"), full_page=True)
        finally:
            browser.close()
