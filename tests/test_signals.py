"""SIGTERM and SIGINT stop a real ``lregions edit`` mid-batch and leave nothing behind: the
command exits with 128 + the signal's number, no process it started survives (its temporary
Prefect server included), the output folder's lease is released, and the same command run again
finishes every row."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from servers import (
    descendants,
    own_server_env,
    start_lregions,
    stop,
    tiny_manifest,
    wait_until,
)

from lregions_core.index import read_index
from lregions_core.lease import LOCK, process_alive, process_start
from lregions_core.store import Store

ROWS = 24


def _parts(out) -> list:
    return list(out.glob("index-parts/run=*/*.parquet"))


def _kill_left(seen: dict[int, str | None]) -> None:
    """SIGKILL whatever of the run survived (only when the test failed)."""
    for pid, start in seen.items():
        if process_alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _stop_mid_batch(signum: int, tmp_path) -> tuple[list[str], dict, object]:
    """Start ``lregions edit`` on ROWS tiny rows, send it ``signum`` once its first index part
    is written, and check that it stopped: exit status 128 + signum within a minute, no process
    it started left (its temporary Prefect server included), the lease released, no traceback,
    and the rows finished so far indexed. Returns the command's arguments, environment and
    output folder."""
    manifest = tiny_manifest(tmp_path / "m.csv", ROWS)
    out = tmp_path / "out"
    args = ["edit", str(manifest), "--out", str(out), "--preset", "tiny", "--chunk-size", "2"]
    env = own_server_env()
    log = tmp_path / "run.log"
    seen: dict[int, str | None] = {}  # every process below the run, with its start time
    run = start_lregions(env, log, *args)

    def mid_batch() -> bool:
        for pid in descendants(run.pid):
            seen.setdefault(pid, process_start(pid))
        return bool(_parts(out))

    try:
        try:
            wait_until(mid_batch, 240, "the first index part was written", run, log)
            assert seen, "the run started no process (its temporary Prefect server is one)"
            assert (out / LOCK).exists()
            os.kill(run.pid, signum)  # the run alone, as `kill` or a scheduler does
            started = time.monotonic()
            wait_until(lambda: run.poll() is not None, 90, "stopped after the signal", None,
                       log)
            took = time.monotonic() - started
        finally:
            stop(run)  # what is left of its process group, if it did not stop
        text = log.read_text(errors="replace")
        assert run.returncode == 128 + signum, text[-3000:]
        assert took < 60
        survivors = [pid for pid, start in seen.items() if process_alive(pid, start)]
        assert survivors == [], survivors
    finally:
        _kill_left(seen)
    assert not (out / LOCK).exists()
    assert "Traceback" not in text and "stopped" in text, text[-3000:]
    done = read_index(Store(str(out)))  # the rows finished before the signal
    assert 1 <= len(done) < ROWS
    return args, env, out


def test_sigterm_stops_the_batch_and_the_same_command_finishes_it(tmp_path):
    args, env, out = _stop_mid_batch(signal.SIGTERM, tmp_path)
    written = {p: p.stat().st_mtime_ns for p in out.glob("items/*/result.json")}
    rerun = start_lregions(env, tmp_path / "rerun.log", *args)
    try:
        assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    finally:
        stop(rerun)
    table = read_index(Store(str(out)))
    assert len(table) == ROWS and (table["status"] == "ok").all()
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # not computed again
    assert not (out / LOCK).exists()


def test_sigint_stops_the_batch_and_leaves_nothing_running(tmp_path):
    _stop_mid_batch(signal.SIGINT, tmp_path)
