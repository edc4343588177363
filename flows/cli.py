"""``lregions``: the command line. The library's commands (``edit-image``, ``presets``,
``download``, ``report``; see :mod:`lregions_core.cli`) never import Prefect; the batch
commands added here run Prefect flows.

``lregions edit MANIFEST --out DIR``     every row of a CSV manifest, in this process (a flow)
``lregions edit MANIFEST --out DIR --pool NAME``  the same across the workers of a work pool
``lregions deploy [--pool NAME]``        pools, automation and deployments on a Prefect server
``lregions ablate MANIFEST --out DIR --grid grid.yaml``   an ablation grid (a Prefect flow)

Exit status: 0 success (every row ok); 1 some row or the work failed, or the output folder is in
use by another run (one line on stderr names it; nothing was done); 2 usage error; 130 stopped by
SIGINT (Ctrl-C), 143 stopped by SIGTERM.

One run writes into an output folder at a time: ``edit`` and ``ablate`` take the folder's lease
(:mod:`lregions_core.lease`) before Prefect starts, and hold it until the index is merged and the
report written; ``--wait-lock SECONDS`` waits for another run's lease instead of refusing.

SIGTERM or SIGINT stops ``edit`` (with or without ``--pool``) and ``ablate``: no new task starts,
the flow run ends (Crashed), a coordinator cancels its shard runs, the lease is released,
Prefect's exit handlers stop the temporary server the command started, and it exits 128 + the
signal's number. What was written stays and nothing is half written, so the same command run
again resumes. Stages already running are waited for until :data:`STOP_GRACE_SECONDS` after the
signal; then (or at a second Ctrl-C) the command kills the temporary server, releases the lease
and exits at once, leaving those stages' rows to the rerun.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator

from flows.pools import COORDINATOR_POOL, DEFAULT_POOL, BatchError, check_pool_name
from lregions_core.cli import MODE_CHOICES, build_parser, config_args, positive_int, run
from lregions_core.config import ConfigError, make_config, run_config

STOP_GRACE_SECONDS = 10.0  # after SIGTERM/SIGINT: longest wait for a clean stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def prefect_defaults() -> None:
    """Settings that make Prefect's temporary local server start reliably on a fresh, offline
    machine: its first start runs database migrations, which can take over the default 20 s on
    a small machine, and offline its telemetry races the server for the SQLite lock. A user's
    own settings win."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _holding(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The lease on ``args.out`` for a batch command, taken before Prefect starts its server:
    the flow's own :func:`~lregions_core.lease.hold` then joins it."""
    from lregions_core.lease import hold

    return hold(args.out, wait=args.wait_lock, command=getattr(args, "command_line", None))


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: raised in the main thread, it unwinds the command (the flow run
    ends, the lease is released) and becomes exit status 128 + the signal's number. A
    BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _exit_now(signum: int, why: str) -> None:
    """Exit at once: kill the temporary Prefect server this process started, release its
    leases, and leave with 128 + ``signum`` (no exit handlers run; written files are whole)."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is not None:
        process = server_module.SubprocessASGIServer().server_process  # port None: temporary
        if process is not None:
            with contextlib.suppress(OSError):
                process.kill()
    from lregions_core.lease import release_all

    releasing = threading.Thread(target=release_all, daemon=True)
    releasing.start()
    releasing.join(timeout=10)  # an unreachable store must not hold the exit up
    print(f"lregions: {why}; stopped now", file=sys.stderr, flush=True)
    os._exit(128 + signum)


class _Deadline:
    """Bounds a stop: the first SIGTERM or SIGINT starts a timer that ends the process
    :data:`STOP_GRACE_SECONDS` later unless it has exited by then (:func:`_exit_now`).

    It learns of a signal two ways, so that the timer starts when the signal arrives: from the
    signal wakeup fd (a thread reads the signal numbers Python's C-level handler writes there,
    also while Prefect's own SIGTERM handler runs its clean-up, which waits for the running
    tasks), and from this module's handler. Thread-safety: :meth:`start` runs in that thread
    and in the main thread; ``_mutex`` makes the first call the only one that starts a timer."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._mutex = threading.RLock()  # re-entrant: a handler may interrupt the main thread

    def start(self, signum: int) -> None:
        with self._mutex:
            if self.signum is not None:
                return
            self.signum = signum
        name = signal.Signals(signum).name
        print(f"lregions: {name}: stopping (what is written stays; rerun to resume)",
              file=sys.stderr, flush=True)
        timer = threading.Timer(STOP_GRACE_SECONDS, _exit_now,
                                (signum, f"not stopped {STOP_GRACE_SECONDS:.0f} s after {name}"))
        timer.daemon = True  # it also bounds the exit handlers that run after main returns
        timer.start()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Read the signal wakeup fd in a daemon thread for the block."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

        def watch() -> None:
            while data := reader.recv(64):
                for signum in data:
                    if signum in STOP_SIGNALS:
                        self.start(signum)

        watcher = threading.Thread(target=watch, daemon=True, name="lregions-signals")
        watcher.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous)
            writer.close()  # the watcher reads the end of the stream and returns
            watcher.join(timeout=5)
            reader.close()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Stopped` for the block, bounded in time by a
    :class:`_Deadline`; a second signal that reaches this handler (a second Ctrl-C) ends the
    process at once. Only in the main thread: elsewhere Python cannot handle signals.

    Prefect's flow engine puts its own SIGTERM handler in place during a flow run: it cancels the
    task runner (waiting for the tasks that run), marks the run Crashed and sends SIGTERM again,
    which then reaches this handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    deadline, raised = _Deadline(), []

    def on_signal(signum: int, frame: object) -> None:
        if raised:
            _exit_now(raised[0], f"{signal.Signals(signum).name} again while stopping")
        raised.append(signum)
        deadline.start(signum)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        with deadline.watching():
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _cmd_edit(args: argparse.Namespace) -> int:
    """The batch pipeline: in this process (a Prefect flow run), or with ``--pool`` across the
    workers of a work pool (this process runs the coordinator, outside every worker slot)."""
    from lregions_core.manifest import read_manifest
    from lregions_core.remote import SettingsError, check_settings

    run_config(args.preset, args.mode, args.set)  # usage check
    try:
        check_settings()  # the LREGIONS_HTTP_* variables, once, not on every image
    except SettingsError as exc:
        raise ConfigError(str(exc)) from None
    total = len(read_manifest(args.manifest))  # usage errors before any work
    prefect_defaults()
    if args.pool:  # usage errors before the lease: nothing is written
        from prefect.client.orchestration import get_client

        from flows.coordinator import check_pool
        from flows.deploy import api_url, check_server

        check_pool_name(args.pool)
        check_server(api_url())  # seconds, not a hang, when the server is not there
        with get_client(sync_client=True) as client:
            check_pool(client, args.pool)
    with _holding(args):
        return _edit(args, total)


def _edit(args: argparse.Namespace, total: int) -> int:
    """The work of ``_cmd_edit``, under the output folder's lease."""
    common = {"manifest": args.manifest, "out": args.out, "preset": args.preset,
              "mode": args.mode, "sets": list(args.set), "chunk_size": args.chunk_size}
    if args.pool:
        from flows.coordinator import coordinate

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
    with _holding(args):
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


def _seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _wait_lock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-lock", type=_seconds, default=0.0, metavar="SECONDS",
                   help="when another run holds the output folder, wait this long for it "
                   "(default: refuse at once)")


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
    _wait_lock_arg(p)
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
    _wait_lock_arg(p)
    p.set_defaults(run=_cmd_ablate)
    return parser


def main(argv: list[str] | None = None) -> int:
    import shlex

    from lregions_core.lease import LeaseError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_app_parser()
    parser.set_defaults(command_line=shlex.join(["lregions", *argv]))  # the lease's holder
    with _stop_on_signals():
        try:
            return run(parser, argv)
        except (BatchError, LeaseError) as exc:
            print(f"lregions: {exc}", file=sys.stderr)
            return 1
        except Stopped as exc:
            print(f"lregions: stopped by {exc}; run the same command again to resume",
                  file=sys.stderr)
            return 128 + exc.signum


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
