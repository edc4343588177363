"""Batches across Prefect workers: rows per second with one and with two workers on the same
oracle-preset manifest, measured side by side in one run (a real ``prefect server`` on
127.0.0.1 with SQLite, ``lregions deploy``, ``prefect worker`` processes, ``lregions edit
--pool``), the share of the workers' time spent outside the stages, and how that share moves
with the shard size.

    python benchmarks/bench_workers.py [--rows 192] [--shard-size 48] [--shard-sizes 12,48,192]

Each batch writes to a fresh output folder, so nothing is reused between them.

"Outside the stages" is measured per shard run from the server's records: the time a worker
held the run (from the worker taking it, state Pending, to the run's end) minus the time covered
by its stage task runs (the union of their intervals). What is left is the flow-run start (a new
process: imports, the deployment's pull step), the flow engine's server round trips and the
shard's bookkeeping. The oracle preset loads no model, so model loading is not part of it here;
with real models, loading them once per shard run adds to it (larger shards amortise it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the real-server helpers the tests use
sys.path.insert(0, str(HERE))

from bench_batch import oracle_manifest
from servers import client_env, lregions, prefect_server, start_worker, stop

POOL = "lregions-bench"


def _api(api: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{api}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def _t(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def outside_share(api: str, since: float) -> tuple[float, int]:
    """(share of worker-held time outside the stages, shard runs) for shard runs since ``since``."""
    runs = [r for r in _api(api, "/flow_runs/filter", {"flow_runs": {"name": {"like_": "-shard"}},
                                                       "limit": 200})
            if r["end_time"] and _t(r["created"]) >= since]
    held = inside = 0.0
    for run in runs:
        states = _api(api, f"/flow_run_states/?flow_run_id={run['id']}")
        pending = [_t(s["timestamp"]) for s in states if s["type"] == "PENDING"]
        taken = min(pending) if pending else _t(run["start_time"])
        held += _t(run["end_time"]) - taken
        tasks = _api(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}},
                                                "limit": 200})
        inside += _union([(_t(t["start_time"]), _t(t["end_time"])) for t in tasks
                          if t["start_time"] and t["end_time"]])
    return (1 - inside / held if held else float("nan")), len(runs)


def batch(api: str, env: dict, manifest: Path, out: Path, workers: int, shard_size: int,
          logs: Path) -> dict:
    """One batch on ``workers`` fresh workers; seconds, rows/s and the outside share."""
    started_workers = [start_worker(env, POOL, f"{out.name}-w{i}", logs / f"{out.name}-w{i}.log")
                       for i in range(workers)]
    try:
        time.sleep(5)  # let them come online before the clock starts
        since = time.time()
        start = time.perf_counter()
        done = lregions(env, "edit", str(manifest), "--out", str(out), "--pool", POOL,
                        "--preset", "oracle", "--shard-size", str(shard_size),
                        "--max-shards-in-flight", str(2 * workers), timeout=3600)
        seconds = time.perf_counter() - start
    finally:
        for worker in started_workers:
            stop(worker)
    if done.returncode != 0:
        raise RuntimeError(f"batch failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    rows = sum(1 for _ in manifest.open()) - 1
    share, shard_runs = outside_share(api, since)
    return {"seconds": seconds, "rows_per_s": rows / seconds, "outside": share,
            "shard_runs": shard_runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--shard-size", type=int, default=48, help="for the 1 vs 2 comparison")
    parser.add_argument("--shard-sizes", default="12,48,192", help="2 workers, each size")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; oracle preset, "
          f"{args.rows} rows; a real prefect server (SQLite) and workers on 127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = oracle_manifest(folder, args.rows)
        with prefect_server(folder / "server") as api:
            env = client_env(api, folder / "client")
            deployed = lregions(env, "deploy", "--pool", POOL)
            if deployed.returncode != 0:
                raise RuntimeError(deployed.stderr[-2000:])
            one = batch(api, env, manifest, folder / "one", 1, args.shard_size, folder)
            two = batch(api, env, manifest, folder / "two", 2, args.shard_size, folder)
            print(f"\nOne and two workers (shard size {args.shard_size})\n")
            print("| workers | shard runs | wall (s) | rows per s | outside the stages |")
            print("|---|---|---|---|---|")
            for n, found in ((1, one), (2, two)):
                print(f"| {n} | {found['shard_runs']} | {found['seconds']:.1f} | "
                      f"{found['rows_per_s']:.2f} | {found['outside']:.2f} |")
            print(f"\ntwo workers / one worker, rows per second: "
                  f"{two['rows_per_s'] / one['rows_per_s']:.2f}")
            print("\nShard size (two workers)\n")
            print("| shard size | shard runs | wall (s) | rows per s | outside the stages |")
            print("|---|---|---|---|---|")
            for size in (int(s) for s in args.shard_sizes.split(",")):
                found = (two if size == args.shard_size else
                         batch(api, env, manifest, folder / f"size{size}", 2, size, folder))
                print(f"| {size} | {found['shard_runs']} | {found['seconds']:.1f} | "
                      f"{found['rows_per_s']:.2f} | {found['outside']:.2f} |")


if __name__ == "__main__":
    main()
