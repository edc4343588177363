"""The output folder's lease (lregions_core/lease.py): one run writes into a folder at a time.

The lease's rules on a local folder and on a real S3 API server (moto's server mode, the
``s3_server`` fixture), then two real ``lregions edit`` processes on one folder: the second
refuses within seconds naming the first, and with ``--wait-lock`` waits for it and reuses
everything."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from servers import (
    ROOT,
    lregions,
    own_server_env,
    start_lregions,
    stop,
    tiny_manifest,
    wait_until,
)

from lregions_core.index import read_index
from lregions_core.lease import (
    LOCK,
    Lease,
    LeaseHeld,
    LeaseLost,
    hold,
    process_alive,
    process_start,
    this_machine,
)
from lregions_core.store import Store


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> str:
    """An output folder that does not exist yet: local, or on the S3 API server."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_server")
    store = Store("s3://lregions-lease")
    if not store.fs.exists("lregions-lease"):
        store.fs.mkdir("lregions-lease")
    return f"s3://lregions-lease/{uuid.uuid4().hex}"


def lock_record(folder: str) -> dict | None:
    store = Store(folder)
    return store.read_json(LOCK) if store.exists(LOCK) else None


def foreign(**changes) -> dict:
    """A lock record of a run on another machine."""
    now = time.time()
    return {"lease": 1, "token": "elsewhere", "host": "node-9", "machine": "node-9|boot|pid:[1]",
            "pid": 4242, "pid_start": "1", "command": "lregions edit other.csv --out x",
            "started": now - 600, "heartbeat": now, "timeout": 60.0, **changes}


def test_one_holder_at_a_time_and_the_refusal_names_it(folder):
    first = Lease(folder, command="lregions edit a.csv --out here").acquire()
    try:
        record = lock_record(folder)
        assert record["token"] == first.token and record["pid"] == os.getpid()
        assert record["command"] == "lregions edit a.csv --out here"
        assert set(record) >= {"pid_start", "started", "heartbeat", "timeout"}
        assert record["host"] == socket.gethostname() and record["machine"] == this_machine()
        started = time.monotonic()
        with pytest.raises(LeaseHeld) as refused:
            Lease(folder, command="second").acquire()
        assert time.monotonic() - started < 5
        message = str(refused.value)
        for part in (f"pid {os.getpid()}", socket.gethostname(), "lregions edit a.csv --out here",
                     "since ", "last heartbeat", "--wait-lock SECONDS"):
            assert part in message, (part, message)
        assert lock_record(folder)["token"] == first.token  # the refusal changed nothing
    finally:
        first.release()
    assert lock_record(folder) is None
    second = Lease(folder).acquire()  # free again
    second.release()


def test_runs_starting_together_get_one_lease(folder):
    _one_of_eight_gets_it(folder)


def test_a_store_without_exclusive_create_reads_the_lock_back():
    """fsspec's in-memory store: the lease is taken by create, a pause and a read-back."""
    folder = f"memory://lregions-lease/{uuid.uuid4().hex}"
    assert not Lease(folder)._lock.exclusive
    _one_of_eight_gets_it(folder)
    assert lock_record(folder) is None


def _one_of_eight_gets_it(folder: str) -> None:
    """Eight takers released at once by a barrier: exactly one gets the lease."""
    leases = [Lease(folder, command=f"taker {n}") for n in range(8)]
    barrier, won, refused = threading.Barrier(len(leases)), [], []

    def take(lease: Lease) -> None:
        barrier.wait(timeout=30)
        try:
            won.append(lease.acquire())
        except LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert len(won) == 1 and len(refused) == 7
        assert lock_record(folder)["token"] == won[0].token
    finally:
        for lease in won:
            lease.release()


TAKE_AND_SLEEP = """
import sys, time
from lregions_core.lease import Lease
Lease(sys.argv[1], command="doomed run").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(folder):
    child = subprocess.Popen([sys.executable, "-c", TAKE_AND_SLEEP, folder], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {child.pid} .*doomed run"):
            Lease(folder).acquire()  # alive: refused
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        stop(child)
        child.stdout.close()
    said: list[str] = []
    started = time.monotonic()
    lease = Lease(folder, say=said.append).acquire()  # the heartbeat is fresh: the pid decides
    try:
        assert time.monotonic() - started < 5
        assert lock_record(folder)["token"] == lease.token
        assert any("took over" in m and f"pid {child.pid}" in m and "gone" in m for m in said)
    finally:
        lease.release()


def test_a_reused_pid_is_not_mistaken_for_the_holder(folder):
    me = os.getpid()
    assert process_alive(me, process_start(me))
    assert not process_alive(me, "not-my-start-time")
    store = Store(folder)
    store.write_json(LOCK, foreign(machine=this_machine(), pid=me, pid_start="not-my-start-time"))
    said: list[str] = []
    lease = Lease(folder, say=said.append).acquire()
    lease.release()
    assert any("took over" in m for m in said)


def test_another_machines_lease_goes_stale_when_its_heartbeat_stops(folder):
    store = Store(folder)
    store.write_json(LOCK, foreign())  # fresh: its pid means nothing on this machine
    with pytest.raises(LeaseHeld, match="pid 4242 on host node-9"):
        Lease(folder).acquire()
    store.write_json(LOCK, foreign(heartbeat=time.time() - 30, timeout=20.0))
    with pytest.raises(LeaseHeld):  # the reader's timeout (60 s) is the larger: not yet stale
        Lease(folder, timeout=60).acquire()
    store.write_json(LOCK, foreign(heartbeat=time.time() - 120))
    said: list[str] = []
    lease = Lease(folder, say=said.append).acquire()
    try:
        assert lock_record(folder)["token"] == lease.token
        assert any("took over" in m and "no heartbeat for 12" in m for m in said), said
    finally:
        lease.release()


def test_only_the_holder_releases_and_a_lost_lease_is_noticed(folder):
    said: list[str] = []
    lease = Lease(folder, say=said.append).acquire()
    lease.check()  # still ours
    Store(folder).write_json(LOCK, foreign())  # another run took it over
    with pytest.raises(LeaseLost, match="node-9"):
        lease.check()
    lease.release()
    assert lock_record(folder)["token"] == "elsewhere"  # not ours: left alone


def test_the_heartbeat_advances_and_a_waiting_run_gets_the_lease(folder):
    lease = Lease(folder, timeout=4, heartbeat_seconds=0.2).acquire()
    try:
        first = lock_record(folder)["heartbeat"]
        wait_until(lambda: lock_record(folder)["heartbeat"] > first + 0.3, 15,
                   "the heartbeat advanced")
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match=r"after waiting \d+ s"):
            Lease(folder).acquire(wait=1.5)
        assert time.monotonic() - started >= 1.5
        threading.Timer(1.0, lease.release).start()
        said: list[str] = []
        waiter = Lease(folder, say=said.append).acquire(wait=30)
        assert lock_record(folder)["token"] == waiter.token
        assert any("waiting up to 30 s" in m for m in said)
        waiter.release()
    finally:
        lease.release()


def test_hold_joins_the_lease_this_process_already_holds(tmp_path):
    out = str(tmp_path / "out")
    with hold(out, command="outer") as outer:
        with hold(out) as inner:
            assert inner is outer
        assert lock_record(out)["token"] == outer.token  # the inner block released nothing
    assert lock_record(out) is None


# -- two lregions processes on one folder ---------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_on_a_folder_refuses_or_waits(where, tmp_path, request):
    """One run finishes with a complete index; a second one started while it runs refuses
    within seconds naming it (exit 1, one line on stderr); a third with --wait-lock waits for
    it, then reuses every row."""
    if where == "s3":
        request.getfixturevalue("s3_server")
        Store("s3://lregions-lease").fs.mkdir("lregions-two")
        out = "s3://lregions-two/out"
    else:
        out = str(tmp_path / "out")
    manifest = tiny_manifest(tmp_path / "m.csv", 8)
    args = ["edit", str(manifest), "--out", out, "--preset", "tiny", "--chunk-size", "2"]
    env = own_server_env()
    first = start_lregions(env, tmp_path / "first.log", *args)
    waiter = None
    try:
        wait_until(lambda: Store(out).exists(LOCK), 120, "the first run took the lease", first,
                   tmp_path / "first.log")
        started = time.monotonic()
        second = lregions(env, *args, timeout=120)
        took = time.monotonic() - started
        assert first.poll() is None, "the first run ended before the second one looked"
        assert second.returncode == 1, second.stderr[-3000:]
        assert took < 30
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        for part in ("is in use by another run", f"pid {first.pid} ", " edit ", out,
                     "--wait-lock"):
            assert part in lines[0], (part, lines[0])

        waiter = start_lregions(env, tmp_path / "waiter.log", *args, "--wait-lock", "600")
        assert first.wait(timeout=400) == 0, (tmp_path / "first.log").read_text()[-3000:]
        assert waiter.wait(timeout=400) == 0, (tmp_path / "waiter.log").read_text()[-3000:]
    finally:
        stop(first)
        if waiter is not None:
            stop(waiter)
    table = read_index(Store(out))
    assert len(table) == 8 and (table["status"] == "ok").all()
    assert table["reused"].all()  # the waiting run found every row done
    waited = (tmp_path / "waiter.log").read_text()
    assert "waiting up to 600 s" in waited and f"pid {first.pid} " in waited
    assert not Store(out).exists(LOCK)
    assert not Store(out).exists("index-parts")



def test_a_flow_called_from_python_takes_the_lease_itself(prefect_server, tmp_path):
    """Outside the command line (from Python, or as a deployment) the flow takes the lease: a
    folder another run holds is refused before anything is written."""
    from flows.batch_edit import batch_edit

    out = tmp_path / "out"
    Store(str(out)).write_json(LOCK, foreign())
    with pytest.raises(LeaseHeld, match="pid 4242 on host node-9"):
        batch_edit(manifest=str(tiny_manifest(tmp_path / "m.csv", 2)), out=str(out),
                   preset="tiny")
    assert [p.name for p in out.iterdir()] == [LOCK]  # nothing written
