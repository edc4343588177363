"""One batch across the workers of a Prefect work pool.

The coordinator checks the manifest, cuts it into shards and submits each shard as a flow run of
the ``lregions-shard/<pool>`` deployment (:mod:`flows.shard`), keeping at most
``max_shards_in_flight`` submitted. It follows their states and:

- a shard run that crashed or failed (a lost worker, a killed process, an infrastructure error)
  is submitted again, up to ``max_attempts`` runs per shard; the new run skips the chunks the
  last one finished and reuses every item it wrote. Rows that failed as data (a corrupt image)
  are recorded as failed in the index parts and are not run again;
- a worker killed with SIGKILL, or a node that disappears, leaves its run "Running" in stock
  Prefect. Shard runs send heartbeats, and an automation on the server
  (:data:`ZOMBIE_AUTOMATION`, created by ``lregions deploy`` and checked here) marks a shard run
  whose heartbeats stop as Crashed, so it is submitted again;
- with shards waiting and no worker online in the pool it says so every
  :data:`REPEAT_WARNING_SECONDS`, and gives up after ``wait_for_workers`` seconds; an unreachable
  server is retried for ``server_timeout`` seconds. Giving up leaves the run's index parts in
  place: the same command run again resumes it (:func:`lregions_core.index.begin_run`).

At the end it merges the parts into ``index.parquet`` (rows of a shard that could not be run are
listed as failed, with the reason), writes the report and publishes the usual artifacts.

The coordinator holds the output folder's lease (:mod:`lregions_core.lease`) from before its
first write until the report is written; its shard runs write under that lease and never take it
themselves. When the coordinator stops early for any reason (an error, SIGTERM or SIGINT) it
cancels the shard runs it has in flight, so nothing writes into the folder once it lets go.

The coordinator must never wait inside a worker slot its shards need: run it from the command
line (``lregions edit --pool``) or from its own pool (``lregions-coordinator``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

import httpx
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run as flow_run_context
from prefect.states import Cancelled, Cancelling

from flows.batch_edit import advance, hold_output, publish_report, summarise
from flows.pools import DEFAULT_POOL, BatchError, check_pool_name
from flows.shard import SHARD_FLOW, SHARD_TAG, shard_prefix
from lregions_core import index
from lregions_core.batch import new_state
from lregions_core.config import ConfigError, run_config
from lregions_core.manifest import ManifestRow, read_manifest
from lregions_core.store import Store

HEARTBEAT_SECONDS = 30  # shard runs' heartbeat (Prefect's smallest); set in prefect.yaml
ZOMBIE_AUTOMATION = "lregions: crash shard runs whose heartbeats stopped"
ZOMBIE_AFTER = timedelta(seconds=3 * HEARTBEAT_SECONDS)  # three heartbeats missed
REPEAT_WARNING_SECONDS = 30.0
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
RETRY = {StateType.FAILED, StateType.CRASHED}


def shard_deployment(pool: str) -> str:
    """The shard deployment of ``pool``: ``lregions deploy --pool NAME`` names it after it."""
    return f"{SHARD_FLOW}/{check_pool_name(pool)}"


def check_pool(client: Any, pool: str) -> Any:
    """The shard deployment for ``pool``, or a usage error that says how to make it."""
    name = shard_deployment(pool)
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ConfigError(f"work pool {pool!r} has no lregions shard deployment ({name}); "
                          f"run `lregions deploy --pool {pool}` against this server") from None
    if deployment.work_pool_name != pool:
        raise ConfigError(f"deployment {name} runs on pool {deployment.work_pool_name!r}, not "
                          f"{pool!r}; run `lregions deploy --pool {pool}` again")
    return deployment


def zombie_automation() -> Any:
    """Marks a shard run as Crashed when its heartbeats stop (its worker or node is gone)
    before it reached a final state: Prefect's "detect zombie flows" automation, limited to
    runs tagged :data:`SHARD_TAG`."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    final_events = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled",
                                                       "Crashed")}
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="lregions shard runs send a heartbeat every 30 s; three missed means the "
                    "worker or node is gone: the coordinator then runs the shard again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final_events},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            match_related={"prefect.resource.id": [f"prefect.tag.{SHARD_TAG}"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=ZOMBIE_AFTER,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="no heartbeat: the worker or its node was lost")],
    )


def ensure_zombie_automation(client: Any) -> bool:
    """Create the zombie-run automation unless the server has it; True when created."""
    if client.read_automations_by_name(ZOMBIE_AUTOMATION):
        return False
    client.create_automation(zombie_automation())
    return True


@dataclass
class Shard:
    number: int
    rows: list[ManifestRow]
    chunks: int  # parts a finished shard has written
    attempts: int = 0
    run_id: UUID | None = None  # the Prefect flow run now following
    state: str = "waiting"  # waiting, submitted, done, lost
    reason: str = ""
    queued_since: float | None = None  # submitted and not started yet

    def parts(self) -> list[str]:
        return [f"{shard_prefix(self.number)}{k:06d}" for k in range(self.chunks)]

    def chunk(self, k: int, chunk_size: int) -> list[ManifestRow]:
        """The rows of chunk ``k`` (part ``parts()[k]``)."""
        return self.rows[k * chunk_size:(k + 1) * chunk_size]


@dataclass
class _Batch:
    """The coordinator's bookkeeping for one batch (a plain loop in the coordinator's thread)."""

    client: Any
    store: Store
    run_id: str
    pool: str
    parameters: dict
    chunk_size: int
    max_in_flight: int
    max_attempts: int
    shards: list[Shard]
    log: Any  # the run's logger: warnings reach the console and the Prefect UI
    seen_parts: set[str] = field(default_factory=set)
    warned: float = 0.0

    def in_flight(self) -> list[Shard]:
        return [s for s in self.shards if s.state == "submitted"]

    def submit(self, shard: Shard) -> None:
        attempt = shard.attempts + 1
        run = run_deployment(
            shard_deployment(self.pool),
            parameters={**self.parameters, "rows": [r.to_record() for r in shard.rows],
                        "shard": shard.number},
            timeout=0,  # do not wait: the coordinator follows every shard itself
            flow_run_name=f"{self.run_id}-shard{shard.number:05d}-try{attempt}",
            tags=[SHARD_TAG],
            # The same key if this request is retried after a lost answer (no second run); a
            # coordinator resuming this batch later has its own flow run id, so new keys.
            idempotency_key=f"{flow_run_context.id}-{shard.number}-{attempt}",
        )
        shard.attempts, shard.run_id, shard.state = attempt, run.id, "submitted"
        shard.queued_since = time.monotonic()

    def progress(self, parts: set[str]) -> None:
        """Advance the progress bar by the rows of parts written since the last look."""
        new = parts - self.seen_parts
        self.seen_parts |= new
        rows = 0
        for part in new:
            shard, chunk = (int(x) for x in part.lstrip("s").split("-"))
            if shard < len(self.shards):
                rows += len(self.shards[shard].chunk(chunk, self.chunk_size))
        if rows:
            advance(rows)

    def follow(self, parts: set[str]) -> None:
        """Read the states of the runs in flight; resubmit, finish or give up shards."""
        following = {s.run_id: s for s in self.in_flight()}
        if not following:
            return
        runs = self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(following))))
        for run in runs:
            shard, state = following[run.id], run.state
            kind = state.type if state else StateType.PENDING
            if kind not in (StateType.SCHEDULED, StateType.PENDING):
                shard.queued_since = None
            if kind not in FINAL:
                continue
            message = f"{state.name}: {state.message or ''}".strip(": ")
            missing = set(shard.parts()) - parts
            if kind == StateType.COMPLETED and not missing:
                shard.state = "done"
            elif kind in RETRY or kind == StateType.COMPLETED:
                if kind == StateType.COMPLETED:
                    message = f"completed without writing {sorted(missing)}"
                self.log.warning("shard %s run %s ended %s", shard.number, shard.attempts,
                                 message)
                if shard.attempts < self.max_attempts:
                    self.submit(shard)
                else:
                    shard.state, shard.reason = "lost", (
                        f"shard {shard.number} failed {shard.attempts} times, last: {message}")
            else:  # cancelled by someone: their call, not ours to retry
                shard.state, shard.reason = "lost", f"shard {shard.number} {message}"

    def check_workers(self, wait_for_workers: float) -> None:
        """Say so when shards wait and no worker of the pool is online; give up after
        ``wait_for_workers`` seconds of that."""
        queued = [s.queued_since for s in self.in_flight() if s.queued_since is not None]
        if not queued:
            return
        online = [w for w in self.client.read_workers_for_work_pool(self.pool)
                  if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"]
        waited = time.monotonic() - min(queued)
        if online:
            return
        if waited > wait_for_workers:
            self.cancel_in_flight("lregions: no worker came online")
            raise BatchError(
                f"no worker online in pool {self.pool!r} for {waited:.0f} s; start workers "
                f"(`prefect worker start --pool {self.pool} --limit 1`, one per GPU) and run "
                "the same command again: it resumes this batch")
        if time.monotonic() - self.warned > REPEAT_WARNING_SECONDS:
            self.warned = time.monotonic()
            self.log.warning("waiting for a worker of pool %r: %s shard run(s) queued for %.0f s "
                             "(giving up after %.0f s)", self.pool, len(queued), waited,
                             wait_for_workers)

    def follow_all(self, wait_for_workers: float, server_timeout: float,
                   poll_seconds: float) -> None:
        """Submit and follow the shards until each is done or lost; a server that cannot be
        reached is retried for ``server_timeout`` seconds."""
        unreachable_since = None
        while any(s.state in ("waiting", "submitted") for s in self.shards):
            try:
                parts = index.part_names(self.store, "", self.run_id)
                self.progress(parts)
                self.follow(parts)
                for shard in self.shards:
                    if shard.state == "waiting" and len(self.in_flight()) < self.max_in_flight:
                        self.submit(shard)
                self.check_workers(wait_for_workers)
                unreachable_since = None
            except (OSError, httpx.HTTPError) as exc:  # the server restarting, a network blip
                unreachable_since = unreachable_since or time.monotonic()
                down = time.monotonic() - unreachable_since
                self.log.warning("cannot follow the shards (%s: %s); retrying for %.0f s more",
                                 type(exc).__name__, exc, server_timeout - down)
                if down > server_timeout:
                    raise BatchError(
                        f"lost the Prefect server for {down:.0f} s; run the same command "
                        "again when it is back: it resumes this batch") from exc
            time.sleep(poll_seconds)

    def cancel_in_flight(self, why: str) -> None:
        """Cancel the shard runs in flight: queued ones at once, started ones through their
        worker (Cancelling: the worker stops the run's process)."""
        for shard in self.in_flight():
            state = Cancelled if shard.queued_since is not None else Cancelling
            self.client.set_flow_run_state(shard.run_id, state(message=why), force=True)
            shard.state, shard.reason = "lost", f"shard {shard.number} cancelled: {why}"

    def fail_lost_rows(self, config: Any, parts: set[str]) -> None:
        """Index parts for the rows of shards that could not be run: failed, with the reason."""
        for shard in self.shards:
            if shard.state != "lost":
                continue
            for k, part in enumerate(shard.parts()):
                if part in parts:
                    continue
                states = [new_state(r) for r in shard.chunk(k, self.chunk_size)]
                for state in states:
                    if state["status"] == "pending":
                        state.update(status="error", error=shard.reason)
                index.write_part(self.store, "", self.run_id, part, states, config)


@flow(name="lregions-coordinator", log_prints=True)
def coordinate(
    manifest: str,
    out: str,
    pool: str = DEFAULT_POOL,
    preset: str = "default",
    mode: str | None = None,
    sets: list[str] | None = None,
    shard_size: int = 32,
    max_shards_in_flight: int = 8,
    max_attempts: int = 3,
    chunk_size: int = 8,
    evaluate: bool = True,
    report: bool = True,
    wait_for_workers: float = 600.0,
    server_timeout: float = 300.0,
    poll_seconds: float = 2.0,
    wait_lock: float = 0.0,
) -> dict:
    """Edit every row of ``manifest`` into ``out`` on the workers of ``pool``, in shards of
    ``shard_size`` rows; finished items of earlier runs are reused and an unfinished batch with
    the same rows and settings is resumed. Another run holding ``out`` makes this one fail at
    once, or after waiting ``wait_lock`` seconds."""
    started = time.perf_counter()
    for name, value in (("shard_size", shard_size), ("max_shards_in_flight",
                        max_shards_in_flight), ("max_attempts", max_attempts),
                        ("chunk_size", chunk_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    config = run_config(preset, mode, sets)
    rows = read_manifest(manifest)
    store = Store(out)
    with hold_output(out, wait_lock) as held:
        run_id, parts = index.begin_run(store, "", index.fingerprint(
            rows, config, chunk_size=chunk_size, shard_size=shard_size, evaluate=evaluate))
        shards = [Shard(n, rows[start:start + shard_size],
                        math.ceil(len(rows[start:start + shard_size]) / chunk_size))
                  for n, start in enumerate(range(0, len(rows), shard_size))]
        log = get_run_logger()
        with get_client(sync_client=True) as client:
            check_pool(client, pool)
            # named after the batch run, as its shard runs are: easy to find in the UI
            client.update_flow_run(flow_run_context.id, name=f"batch-{run_id}")
            if ensure_zombie_automation(client):
                print(f"created the automation {ZOMBIE_AUTOMATION!r} on the server")
            batch = _Batch(client, store, run_id, pool,
                           {"out": out, "run_id": run_id, "preset": preset, "mode": mode,
                            "sets": sets or [], "chunk_size": chunk_size, "evaluate": evaluate},
                           chunk_size, max_shards_in_flight, max_attempts, shards, log)
            for shard in shards:  # finished by the run this one resumes
                if set(shard.parts()) <= parts:
                    shard.state = "done"
            batch.progress(parts)
            print(f"run {run_id}: {len(rows)} rows in {len(shards)} shards on pool {pool!r} "
                  f"({sum(s.state == 'done' for s in shards)} already done)")
            try:
                batch.follow_all(wait_for_workers, server_timeout, poll_seconds)
            except BaseException:  # an error, SIGTERM, SIGINT: no shard writes on after this
                with contextlib.suppress(Exception):
                    batch.cancel_in_flight("lregions: the coordinator stopped")
                raise
            batch.fail_lost_rows(config, index.part_names(store, "", run_id))
        held.check()
        index.merge(store, "", run_id)
        table = store.read_parquet(index.INDEX)
        ok = int((table["status"] == "ok").sum())
        counts = Counter(rows=len(table), ok=ok, failed=len(table) - ok,
                         reused=int(table["reused"].sum()))
        summary = {**summarise(counts, started), "shards": len(shards),
                   "shard_runs": sum(s.attempts for s in shards),
                   "index": store.url_of(index.INDEX)}
        if report:
            summary["report"] = publish_report(out, summary)
    print(f"coordinator: {summary}")
    return summary
