"""``lregions deploy``: make a Prefect server ready for batches across GPU workers.

Against the server in ``PREFECT_API_URL`` it creates the GPU work pool and the coordinator's own
pool (process pools) when missing, the automation that crashes shard runs whose heartbeats
stopped (:func:`flows.coordinator.zombie_automation`), and registers the deployments of the
project's ``prefect.yaml`` with Prefect's own ``prefect deploy``. In ``prefect.yaml`` the pool
names are written as their defaults (``lregions-gpu``, ``lregions-coordinator``); this command
puts the chosen names in their place (the pool of each deployment, the shard deployment's name,
the coordinators' ``pool`` parameter) in a temporary copy, so several GPU pools can each have
their own shard deployment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from flows.coordinator import ensure_zombie_automation
from flows.pools import COORDINATOR_POOL, DEFAULT_POOL, BatchError, check_pool_name
from lregions_core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "prefect.yaml"


def api_url() -> str:
    """The server to talk to; a usage error when none is set."""
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        raise ConfigError("no Prefect server: set PREFECT_API_URL (e.g. "
                          "http://127.0.0.1:4200/api after `prefect server start`)")
    return url.rstrip("/")


def check_server(url: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, naming the server, when it does not answer."""
    import httpx

    try:
        answer = httpx.get(f"{url}/health", timeout=timeout)
        answer.raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the Prefect server at {url} (PREFECT_API_URL): "
                          f"{type(exc).__name__}: {exc}") from None


def prefect_spec(pool: str, coordinator_pool: str, path: Path = PREFECT_FILE) -> dict:
    """``prefect.yaml`` with the chosen pool names in place of the defaults."""
    if not path.is_file():
        raise ConfigError(f"{path} not found: `lregions deploy` runs from a checkout of the "
                          "project (its prefect.yaml names the deployments)")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    names = {DEFAULT_POOL: pool, COORDINATOR_POOL: coordinator_pool}
    for deployment in spec.get("deployments", []):
        work_pool = deployment.get("work_pool") or {}
        work_pool["name"] = names.get(work_pool.get("name"), work_pool.get("name"))
        if deployment.get("name") in names:  # the shard deployment is named after its pool
            deployment["name"] = names[deployment["name"]]
        parameters = deployment.get("parameters") or {}
        if parameters.get("pool") in names:
            parameters["pool"] = names[parameters["pool"]]
    return spec


def ensure_pools(client, *pools: str) -> list[str]:
    """Create the process work pools that do not exist yet; returns those created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    for pool in pools:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            created.append(pool)
    return created


def deploy(pool: str = DEFAULT_POOL, coordinator_pool: str = COORDINATOR_POOL) -> list[str]:
    """Pools, automation and deployments on the server; returns what was done, line by line."""
    from prefect.client.orchestration import get_client

    check_pool_name(pool)
    check_pool_name(coordinator_pool)
    if pool == coordinator_pool:
        raise ConfigError("the coordinator needs its own pool: a coordinator waiting in the "
                          "only GPU worker's slot would wait for itself")
    url = api_url()
    check_server(url)
    spec = prefect_spec(pool, coordinator_pool)
    lines = []
    with get_client(sync_client=True) as client:
        lines += [f"created work pool {p!r}" for p in ensure_pools(client, pool, coordinator_pool)]
        if ensure_zombie_automation(client):
            lines.append("created the automation that crashes shard runs without heartbeats")
    with tempfile.TemporaryDirectory(prefix="lregions-deploy-") as tmp:
        prefect_file = Path(tmp) / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
             "--prefect-file", str(prefect_file)],
            cwd=ROOT, env={**os.environ, "PREFECT_API_URL": url}, capture_output=True,
            text=True, check=False)
    if done.returncode != 0:
        raise BatchError(f"prefect deploy failed ({done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    lines += [f"deployment {d['name']!r} ({d['entrypoint']}) on pool {d['work_pool']['name']!r}"
              for d in spec["deployments"]]
    return lines
