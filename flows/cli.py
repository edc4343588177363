"""``lregions``: the command line. The library's commands (``edit-image``, ``presets``,
``download``, ``report``; see :mod:`lregions_core.cli`) never import Prefect; the batch
commands added here run Prefect flows.

``lregions edit MANIFEST --out DIR``     every row of a CSV manifest, in this process (a flow)
``lregions edit MANIFEST --out DIR --pool NAME``  the same across the workers of a work pool
``lregions deploy [--pool NAME]``        pools, automation and deployments on a Prefect server
``lregions ablate MANIFEST --out DIR --grid grid.yaml``   an ablation grid (a Prefect flow)

Exit status: 0 success (every row ok), 1 some row or the work failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys

from flows.pools import COORDINATOR_POOL, DEFAULT_POOL, BatchError, check_pool_name
from lregions_core.cli import MODE_CHOICES, build_parser, config_args, positive_int, run
from lregions_core.config import make_config, run_config


def prefect_defaults() -> None:
    """Settings that make Prefect's temporary local server start reliably on a fresh, offline
    machine: its first start runs database migrations, which can take over the default 20 s on
    a small machine, and offline its telemetry races the server for the SQLite lock. A user's
    own settings win."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _cmd_edit(args: argparse.Namespace) -> int:
    """The batch pipeline: in this process (a Prefect flow run), or with ``--pool`` across the
    workers of a work pool (this process runs the coordinator, outside every worker slot)."""
    from lregions_core.manifest import read_manifest

    run_config(args.preset, args.mode, args.set)  # usage check
    total = len(read_manifest(args.manifest))  # usage errors before any work
    prefect_defaults()
    common = {"manifest": args.manifest, "out": args.out, "preset": args.preset,
              "mode": args.mode, "sets": list(args.set), "chunk_size": args.chunk_size}
    if args.pool:
        from prefect.client.orchestration import get_client

        from flows.coordinator import check_pool, coordinate
        from flows.deploy import api_url, check_server

        check_pool_name(args.pool)
        check_server(api_url())  # seconds, not a hang, when the server is not there
        with get_client(sync_client=True) as client:
            check_pool(client, args.pool)

        def run() -> dict:
            return coordinate(**common, pool=args.pool, shard_size=args.shard_size,
                              max_shards_in_flight=args.max_shards_in_flight,
                              wait_for_workers=args.wait_for_workers)
    else:
        from flows.batch_edit import batch_edit

        def run() -> dict:
            return batch_edit(**common)

    from rich.progress import Progress

    from flows.batch_edit import PROGRESS

    with Progress(transient=False) as bar:
        job = bar.add_task("editing", total=total)
        PROGRESS.append(lambda rows: bar.advance(job, rows))
        try:
            summary = run()
        finally:
            PROGRESS.clear()
    print(
        f"{summary['ok']} ok, {summary['failed']} failed, {summary['reused']} reused from cache, "
        f"{summary['seconds']:.1f} s -> {summary['index']}"
    )
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0 if summary["failed"] == 0 else 1


def _cmd_ablate(args: argparse.Namespace) -> int:
    """An ablation grid (a Prefect flow); the grid file format is in flows/ablate.py."""
    from lregions_core.manifest import read_manifest

    read_manifest(args.manifest)  # usage errors before any work
    prefect_defaults()
    from flows.ablate import ablate, cell_overrides, cells, load_grid

    grid = load_grid(args.grid)
    for cell in cells(grid):  # every cell's settings must be valid before any work
        make_config(args.preset or grid.get("preset", "default"),
                    {**grid.get("set", {}), **cell_overrides(cell)}, args.set)
    summary = ablate(manifest=args.manifest, out=args.out, grid=grid, preset=args.preset,
                     sets=list(args.set), chunk_size=args.chunk_size)
    print(f"{summary['cells']} cells, {summary['ok']} ok, {summary['failed']} failed, "
          f"{summary['seconds']:.1f} s -> {summary['table']}")
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0 if summary["failed"] == 0 else 1


def _cmd_deploy(args: argparse.Namespace) -> int:
    """Pools, the lost-worker automation and the deployments of prefect.yaml on the server."""
    prefect_defaults()
    from flows.deploy import deploy

    for line in deploy(args.pool, args.coordinator_pool):
        print(line)
    return 0


def build_app_parser() -> argparse.ArgumentParser:
    parser, sub = build_parser("lregions")

    p = sub.add_parser("edit", help="edit every row of a CSV manifest (Prefect batch flow)")
    p.add_argument("manifest", help="CSV with columns image, prompt [, source, id, seed, target_box]")
    p.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    p.add_argument("--mode", choices=MODE_CHOICES)
    p.add_argument("--chunk-size", type=positive_int, default=8, help="rows per task run")
    p.add_argument("--pool", help="run across the workers of this work pool (needs "
                   "PREFECT_API_URL and `lregions deploy --pool NAME`); default: this process")
    p.add_argument("--shard-size", type=positive_int, default=32,
                   help="with --pool: rows per shard (one flow run on a worker)")
    p.add_argument("--max-shards-in-flight", type=positive_int, default=8,
                   help="with --pool: shard runs submitted at once")
    p.add_argument("--wait-for-workers", type=float, default=600.0, metavar="SECONDS",
                   help="with --pool: give up when no worker is online for this long")
    config_args(p)
    p.set_defaults(run=_cmd_edit)

    p = sub.add_parser("deploy", help="create pools and register the deployments of "
                       "prefect.yaml on the server in PREFECT_API_URL")
    p.add_argument("--pool", default=DEFAULT_POOL, help="GPU work pool (shards)")
    p.add_argument("--coordinator-pool", default=COORDINATOR_POOL,
                   help="the coordinators' own pool (scheduled batches)")
    p.set_defaults(run=_cmd_deploy)

    p = sub.add_parser("ablate", help="run an ablation grid over a manifest (Prefect flow)")
    p.add_argument("manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--grid", required=True, help="YAML grid file (see flows/ablate.py)")
    p.add_argument("--preset", default=None, help="base preset (default: the grid's, else default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chunk-size", type=positive_int, default=8)
    p.set_defaults(run=_cmd_ablate)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_app_parser(), argv)
    except BatchError as exc:
        print(f"lregions: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
