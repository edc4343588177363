"""Real servers for tests and benchmarks, on 127.0.0.1 only, each stopped by whoever started it:
a private PostgreSQL cluster (Debian's package), a ``prefect server`` (SQLite or PostgreSQL) and
``prefect worker`` processes. Every start is bounded in time and says why it failed."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status), failing after ``timeout`` seconds or as
    soon as ``process`` (the server being waited for) exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout} s")
        time.sleep(0.2)


def stop(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process's group, then SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_node(process: subprocess.Popen) -> None:
    """What losing a machine does to a worker: SIGKILL to the worker's whole process group and
    to every process below it (Prefect starts each flow run in a session of its own)."""
    below = descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


# -- PostgreSQL -----------------------------------------------------------------------------------
def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server programs, if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres(timeout: float = 60) -> Iterator[str]:
    """A private PostgreSQL cluster on 127.0.0.1 (a free port) with a ``prefect`` database;
    yields its SQLAlchemy URL for Prefect. The cluster and its files are removed afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    data = Path(tempfile.mkdtemp(prefix="lregions-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=timeout)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "prefect", "--auth=trust",
            "-E", "UTF8")
        run(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w",
            "-t", str(int(timeout)), "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect",
                "prefect")
            yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(data, ignore_errors=True)


# -- Prefect server and workers ---------------------------------------------------------------
def client_env(api: str, home: Path, **extra: str) -> dict[str, str]:
    """Environment for processes that talk to the server at ``api``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", LREGIONS_REPO=str(ROOT), PREFECT_WORKER_QUERY_SECONDS="2",
               OMP_NUM_THREADS="1")  # CPU-only workers on a small shared machine: one torch thread
    env.update(extra)
    return env


@contextlib.contextmanager
def prefect_server(home: Path, database_url: str | None = None,
                   timeout: float = 180) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 (a free port) with its own PREFECT_HOME (SQLite
    there, unless ``database_url``); yields the API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = client_env(api, home, PREFECT_UI_API_URL=api)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
         str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_for_http(f"{api}/health", timeout, server)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}; server log:\n{(home / 'server.log').read_text()[-3000:]}")
        yield api
    finally:
        stop(server)
        log.close()


def start_worker(env: dict[str, str], pool: str, name: str, log: Path) -> subprocess.Popen:
    """``prefect worker start --pool POOL --limit 1`` (one flow run at a time: one GPU)."""
    handle = open(log, "wb")  # noqa: SIM115 - the child keeps it; closed when the test ends
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--limit", "1",
         "--name", name], env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
        start_new_session=True)


def lregions(env: dict[str, str], *args: str, timeout: float = 600,
             **popen) -> subprocess.CompletedProcess:
    """Run the ``lregions`` command (this checkout's) to the end."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False, **popen)


# -- lregions processes -------------------------------------------------------------------------
IMAGES = ("chelsea", "coffee", "astronaut", "rocket")
PROMPTS = ("a red hat", "a green cup", "a bunch of flowers", "bright orange fire", "a blue sky",
           "a small dog", "a wooden boat", "a snowy hill")


def tiny_manifest(path: Path, rows: int) -> Path:
    """A manifest of ``rows`` distinct rows (scikit-image samples x prompts) for tiny runs."""
    lines = ["id,image,prompt"]
    for n in range(rows):
        image, prompt = IMAGES[n % len(IMAGES)], PROMPTS[n // len(IMAGES) % len(PROMPTS)]
        lines.append(f"row{n:03d},skimage:{image},{prompt} {n}")
    path.write_text("\n".join(lines) + "\n")
    return path


def own_server_env(**extra: str) -> dict[str, str]:
    """This environment without PREFECT_API_URL: an ``lregions edit`` started with it runs its
    own temporary Prefect server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(extra)
    return env


def start_lregions(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """Start the ``lregions`` command (this checkout's) in a session of its own, its output to
    ``log``; stop it with :func:`stop`."""
    handle = open(log, "wb")  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()


def wait_until(done, timeout: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``done()`` until true; fail after ``timeout`` seconds, or at once when ``process``
    ends first (with the tail of its ``log``)."""
    deadline = time.monotonic() + timeout
    while not done():
        ended = process is not None and process.poll() is not None
        if ended or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            why = (f"the process ended ({process.returncode}) before {what}" if ended
                   else f"not {what} within {timeout} s")
            raise AssertionError(f"{why}:\n{tail}")
        time.sleep(0.1)


def moto_recorder(endpoint: str, action: str) -> list[dict]:
    """moto's request recorder: reset, start, stop or download (the recorded requests)."""
    if action == "download":
        with urllib.request.urlopen(f"{endpoint}/moto-api/recorder/download-recording",
                                    timeout=30) as answer:
            text = answer.read().decode()
        # One JSON object per request; concurrent requests may share a line, so read them as a
        # stream of objects rather than line by line.
        decoder, found, at = json.JSONDecoder(), [], 0
        while (at := re.compile(r"\s*").match(text, at).end()) < len(text):
            record, at = decoder.raw_decode(text, at)
            found.append(record)
        return found
    request = urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}-recording",
                                     method="POST")
    urllib.request.urlopen(request, timeout=30).close()
    return []
