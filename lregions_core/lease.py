"""A lease on an output folder: at most one run writes into it at a time.

Two runs on one folder would take the same run id (same rows and settings) and merge and delete
each other's index parts. A run therefore holds the folder's lease from before it writes anything
until its index is merged and its report written. The lease is one small JSON object,
``OUT/lregions.lock``, kept through :class:`lregions_core.store.Store`, so it works alike on local
folders and on fsspec object stores::

    {"lease": 1, "token": "<random>", "host": "node-3", "machine": "<host|boot id|pid namespace>",
     "pid": 4242, "pid_start": "123456", "command": "lregions edit demo.csv --out out/demo",
     "started": 1767225600.0, "heartbeat": 1767225642.0, "timeout": 60.0}

- **Taking it**: the lock object is created only when absent. On a local folder the record is
  written to a temporary file that is then hard-linked to the lock's name (the link fails when
  the name exists, and the lock appears whole); where hard links are refused, an ``O_EXCL``
  create. On S3 (s3fs) a PUT with ``If-None-Match: *``, which AWS S3 and moto refuse when the
  object exists. On other fsspec stores ``pipe_file(mode="create")``, which checks and then writes:
  there the run waits :data:`SETTLE_SECONDS` and reads the lock back, so of two runs that start
  together the one whose record was overwritten backs off; what remains is a window of two
  check-then-write calls both taking longer than that, which the heartbeat check below still
  catches before the index is merged. Every taker reads the lock back and proceeds only when it
  carries its own token.
- **Holding it**: a daemon thread rewrites the record's ``heartbeat`` every
  ``heartbeat_seconds`` (a few seconds), after checking the lock still carries this lease's
  token. On S3 the rewrite is a compare-and-swap (``If-Match`` on the ETag read); elsewhere the
  rewrite follows the token check. When the lock is gone or carries another token, the lease is
  *lost*: the thread says so and stops, and :meth:`Lease.check` (called before the index merge)
  raises :class:`LeaseLost`.
- **Stale leases**: a lease is stale when its heartbeat is older than its timeout (the larger of
  the holder's and the reader's), or, when the holder ran on this machine (same host name, boot
  and process namespace), as soon as its process is gone: its pid is not running, is a zombie,
  or runs with another start time (a reused pid). A run killed with SIGKILL therefore never blocks
  the next run on its machine; on another machine the next run takes over after the timeout.
  Heartbeats are wall-clock times, so machines sharing a folder need clocks that agree to well
  within the timeout. A stale lease is taken over (and the run says so): on S3 by a PUT with
  ``If-Match`` on the stale object's ETag; on a local folder by renaming the stale lock aside,
  checking that what was moved is the stale record (else it is put back), and creating a new
  one; elsewhere by deleting it and creating a new one.
- **Refusing**: a run that finds a live lease raises :class:`LeaseHeld`, whose message names the
  holder (host, pid, command, since when, last heartbeat), or with ``wait`` polls until it is
  released or stale and then proceeds, raising :class:`LeaseHeld` when the wait ends first.
- **Releasing**: the lock is removed only while it still carries this lease's token (on S3 a
  DELETE with ``If-Match``; on a local folder moved aside first, then checked).

Within one process :func:`hold` is re-entrant: a second ``hold`` on a folder this process already
holds joins that lease, so the command line can take the lease before it starts Prefect and the
flow it calls (which takes the lease when called any other way) runs under it.

This module is library code: it never imports Prefect or the application's flows.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lregions_core.store import Store

LOCK = "lregions.lock"
DEFAULT_TIMEOUT = 60.0  # seconds without a heartbeat after which a lease is stale
POLL_SECONDS = 1.0  # how often a waiting run looks again
SETTLE_SECONDS = 1.0  # stores without an exclusive create: wait, then read the lock back
# fsspec protocols whose create-if-absent is exclusive on the server or the file system
EXCLUSIVE_PROTOCOLS = frozenset({"file", "local", "s3", "s3a"})
S3_PROTOCOLS = frozenset({"s3", "s3a"})


class LeaseError(RuntimeError):
    """The output folder's lease could not be taken or was lost; the message says who holds it
    and what to do."""


class LeaseHeld(LeaseError):
    """Another run holds the lease (and, with a wait, still held it when the wait ended)."""

    def __init__(self, url: str, holder: dict, waited: float) -> None:
        self.holder = holder
        waiting = f" after waiting {waited:.0f} s" if waited > 0 else ""
        super().__init__(
            f"output folder {url} is in use by another run{waiting}: {describe(holder)}. Let it "
            "finish, or wait for it with --wait-lock SECONDS (flows: wait_lock=SECONDS); a run "
            "that died is taken over once stale (at once on its own machine)")


class LeaseLost(LeaseError):
    """The lock no longer carries this lease's token: another run took the folder over."""


def _say(message: str) -> None:
    print(f"lregions: {message}", file=sys.stderr, flush=True)


# -- who holds it ---------------------------------------------------------------------------
def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (state first), or None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text.rsplit(")", 1)[1].split()


def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc), or None where unknown: with
    the pid it names one process, also after the pid is reused."""
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None


def this_machine() -> str:
    """This machine as far as pids are concerned: host name, boot id and pid namespace (two
    containers that share a host name and kernel but not their pids differ)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts)


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this machine runs, and is the one that started at ``start``
    (when known): a zombie or a reused pid is not."""
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False  # /proc works here: no such process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if stat[0] in ("Z", "X"):
        return False
    return start is None or len(stat) <= 19 or stat[19] == start


def _when(epoch: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))
    except (TypeError, ValueError, OverflowError):
        return "an unknown time"


def describe(record: dict, now: float | None = None) -> str:
    """The holder of a lock record, for messages: host, pid, command, since when, heartbeat."""
    if record.get("unreadable"):
        return f"an unreadable lock file, last written {_when(record.get('modified'))}"
    now = time.time() if now is None else now
    try:
        beat = f"{now - float(record['heartbeat']):.0f} s ago"
    except (KeyError, TypeError, ValueError):
        beat = "never"
    return (f"pid {record.get('pid')} on host {record.get('host')} running "
            f"`{record.get('command')}` since {_when(record.get('started'))}, "
            f"last heartbeat {beat}")


def stale_reason(record: dict, timeout: float, now: float | None = None) -> str | None:
    """Why the lease in ``record`` is stale, or None while its holder is alive."""
    now = time.time() if now is None else now
    try:
        limit = max(float(timeout), float(record.get("timeout") or 0))
    except (TypeError, ValueError):
        limit = float(timeout)
    if record.get("unreadable"):
        age = now - float(record.get("modified") or 0)
        return f"unreadable for {age:.0f} s" if age > limit else None
    if record.get("machine") == this_machine():
        try:
            pid = int(record["pid"])
        except (KeyError, TypeError, ValueError):
            pid = -1
        if pid <= 0 or not process_alive(pid, record.get("pid_start")):
            return f"its process (pid {record.get('pid')}) on this machine is gone"
    try:
        age = now - float(record["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return "it has no heartbeat"
    return f"no heartbeat for {age:.0f} s (timeout {limit:.0f} s)" if age > limit else None


# -- the lock object on each kind of store ----------------------------------------------------
def _precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs error is S3's 412 (a conditional request whose condition did not hold)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed"


class _Lock:
    """Create, read, rewrite and remove the lock object of one output folder. ``version`` is
    what a conditional request compares against: the ETag on S3, None elsewhere (callers compare
    tokens instead)."""

    def __init__(self, store: Store) -> None:
        self.store, self.path = store, store.path(LOCK)
        protocols = store.fs.protocol
        protocols = set(protocols if isinstance(protocols, tuple) else (protocols,))
        self.s3 = bool(protocols & S3_PROTOCOLS)
        self.exclusive = bool(protocols & EXCLUSIVE_PROTOCOLS)

    def _beside(self, kind: str) -> str:
        """A unique hidden name next to the lock (local folders; readers skip ``.`` names)."""
        return posixpath.join(posixpath.dirname(self.path),
                              f".{LOCK}.{secrets.token_hex(8)}.{kind}")

    def read(self) -> tuple[dict | None, Any]:
        """The lock's record and version, or (None, None) when there is no lock. An unreadable
        lock reads as ``{"unreadable": True, "modified": epoch}``."""
        fs = self.store.fs
        version = None
        try:
            if self.s3:
                version = fs.info(self.path, refresh=True)["ETag"]
            data = fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            modified = None
            with contextlib.suppress(OSError, AttributeError, NotImplementedError):
                modified = fs.modified(self.path).timestamp()
            record = {"unreadable": True, "modified": modified}
        return record, version

    def create(self, data: bytes) -> bool:
        """Write the lock only when there is none; False when one exists."""
        if self.store.local:
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            tmp = self._beside("tmp")
            Path(tmp).write_bytes(data)
            try:
                os.link(tmp, self.path)  # fails when the lock exists; appears whole
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here: an exclusive create, then the record
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                return True
            finally:
                os.unlink(tmp)
        try:
            self.store.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def replace(self, data: bytes, version: Any) -> bool:
        """Rewrite the lock; on S3 only while its ETag is still ``version`` (False when not)."""
        if self.s3:
            try:
                self.store.fs.pipe_file(self.path, data, IfMatch=version)
            except OSError as exc:
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    return False
                raise
            return True
        if self.store.local:
            tmp = self._beside("tmp")
            Path(tmp).write_bytes(data)
            os.replace(tmp, self.path)
            return True
        self.store.fs.pipe_file(self.path, data)
        return True

    def remove(self, token: str, version: Any) -> bool:
        """Remove the lock if it still carries ``token`` (read with ``version``); False when it
        carries another (it is left alone)."""
        if self.s3:
            bucket, key, _ = self.store.fs.split_path(self.path)
            try:
                self.store.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            except FileNotFoundError:
                return True
            except OSError as exc:
                if _precondition_failed(exc):
                    return False
                raise
            finally:
                self.store.fs.invalidate_cache(self.path)
            return True
        if self.store.local:
            return self._move_aside(token)
        record, _ = self.read()
        if record is not None and record.get("token") != token:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm_file(self.path)
        return True

    def _move_aside(self, token: str | None) -> bool:
        """Local folders: rename the lock aside (atomic) and delete it if it carried ``token``
        (None: it was unreadable); otherwise put it back. True when it was removed or gone."""
        aside = self._beside("aside")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        try:
            record = json.loads(Path(aside).read_bytes())
        except ValueError:
            record = {}
        if record.get("token") == token:
            os.unlink(aside)
            return True
        with contextlib.suppress(FileExistsError):  # a third run made one meanwhile: keep it
            os.link(aside, self.path)
        os.unlink(aside)
        return False

    def take_over(self, stale: dict, version: Any, data: bytes) -> bool:
        """Replace the ``stale`` record by ``data`` unless the lock changed meanwhile."""
        if self.s3:
            return self.replace(data, version)
        if self.store.local:
            if not self._move_aside(stale.get("token")):
                return False
        else:
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.rm_file(self.path)
        return self.create(data)


# -- the lease ------------------------------------------------------------------------------
class Lease:
    """This process's lease on one output folder (see the module docstring).

    Thread-safety: the main thread (acquire, check, release) and the heartbeat thread (beat)
    share the lease. Every read-modify-write of the lock object and of this object's state runs
    under ``self._mutex``, and :meth:`release` stops and joins the heartbeat thread before it
    removes the lock, so a heartbeat never rewrites a released lock."""

    def __init__(self, out: str | Store, *, timeout: float = DEFAULT_TIMEOUT,
                 heartbeat_seconds: float | None = None, command: str | None = None,
                 say: Callable[[str], None] = _say) -> None:
        self.store = out if isinstance(out, Store) else Store(out)
        self.timeout = float(timeout)
        self.heartbeat_seconds = float(heartbeat_seconds or min(5.0, self.timeout / 4))
        self.command = command or shlex.join(sys.argv)
        self.token = secrets.token_hex(16)
        self.say = say
        self.record: dict | None = None  # ours, while held
        self.lost: str | None = None  # why the lease was lost, once it was
        self._lock = _Lock(self.store)
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.store.url_of(LOCK)

    @property
    def held(self) -> bool:
        return self.record is not None and self.lost is None

    def _new_record(self) -> dict:
        now = time.time()
        pid = os.getpid()
        return {"lease": 1, "token": self.token, "host": socket.gethostname(),
                "machine": this_machine(), "pid": pid, "pid_start": process_start(pid),
                "command": self.command, "started": now, "heartbeat": now,
                "timeout": self.timeout}

    def acquire(self, wait: float = 0.0) -> Lease:
        """Take the lease, waiting up to ``wait`` seconds for a live holder to release it or go
        stale; raises :class:`LeaseHeld` naming the holder when it cannot."""
        started = time.monotonic()
        announced = False
        while True:
            try:
                holder = self._attempt()
            except OSError as exc:  # no such bucket, no permission, no network
                raise LeaseError(f"cannot take the lease {self.url}: {exc}") from exc
            if holder is None:
                self._thread = threading.Thread(target=self._beat_loop, daemon=True,
                                                name=f"lregions-lease-{self.store.url}")
                self._thread.start()
                return self
            waited = time.monotonic() - started
            if waited >= wait:
                raise LeaseHeld(self.store.url, holder, waited if wait > 0 else 0.0)
            if not announced:
                self.say(f"waiting up to {wait:.0f} s for {self.store.url}: in use by "
                         f"{describe(holder)}")
                announced = True
            time.sleep(min(POLL_SECONDS, wait - waited))

    def _attempt(self) -> dict | None:
        """One try at taking the lease: None when it is now ours, else the holder's record."""
        record = self._new_record()
        data = json.dumps(record, indent=2).encode()
        holder = None
        for _ in range(5):  # the lock came or went between two looks: look again
            created = self._lock.create(data)
            if not created:
                holder, version = self._lock.read()
                if holder is None:
                    continue  # released meanwhile
                reason = stale_reason(holder, self.timeout)
                if reason is None:
                    return holder
                if not self._lock.take_over(holder, version, data):
                    continue
                self.say(f"took over the stale lease on {self.store.url} ({reason}): "
                         f"{describe(holder)}")
            if not self._lock.exclusive:
                time.sleep(SETTLE_SECONDS)
            mine, _ = self._lock.read()
            if mine is not None and mine.get("token") == self.token:
                with self._mutex:
                    self.record, self.lost = record, None
                return None
            holder = mine
        if holder is None:
            raise LeaseError(f"could not take the lease {self.url}: it keeps changing")
        return holder

    def beat(self) -> None:
        """Rewrite the heartbeat if the lock is still ours; else mark the lease lost."""
        with self._mutex:
            if self.record is None or self.lost is not None:
                return
            record, version = self._lock.read()
            if record is None or record.get("token") != self.token:
                self._mark_lost(record)
                return
            fresh = {**self.record, "heartbeat": time.time()}
            if self._lock.replace(json.dumps(fresh, indent=2).encode(), version):
                self.record = fresh

    def _mark_lost(self, record: dict | None) -> None:
        """(Under ``self._mutex``.)"""
        self.lost = ("the lock was removed" if record is None
                     else f"it was taken over by {describe(record)}")
        self.say(f"lost the lease on {self.store.url}: {self.lost}")

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a blip: the next beat tries again
                self.say(f"lease heartbeat on {self.store.url} failed ({exc}); retrying")
            if self.lost is not None:
                return

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the lock still carries this lease's token (read now):
        call before a step that must not run twice, such as the index merge."""
        with self._mutex:
            if self.record is not None and self.lost is None:
                record, _ = self._lock.read()
                if record is None or record.get("token") != self.token:
                    self._mark_lost(record)
            lost = self.lost
        if lost is not None:
            raise LeaseLost(f"lost the lease on {self.store.url}: {lost}; nothing was merged. "
                            "Run the same command again when the other run has finished")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it still carries this lease's token."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        with self._mutex:
            if self.record is None:
                return
            self.record = None
            if self.lost is None:
                try:
                    _, version = self._lock.read()
                    self._lock.remove(self.token, version)
                except OSError as exc:
                    self.say(f"could not remove the lease {self.url} ({exc}); it goes stale "
                             f"{self.timeout:.0f} s after its last heartbeat")


# -- one lease per folder per process -------------------------------------------------------
_HELD: dict[str, Lease] = {}  # this process's leases, by folder
_HELD_MUTEX = threading.Lock()


def _key(store: Store) -> str:
    protocol = store.fs.protocol
    return f"{protocol[0] if isinstance(protocol, tuple) else protocol}://{store.root}"


@contextlib.contextmanager
def hold(out: str, *, wait: float = 0.0, timeout: float = DEFAULT_TIMEOUT,
         command: str | None = None, say: Callable[[str], None] = _say) -> Iterator[Lease]:
    """Hold the lease on output folder ``out`` for the block (waiting up to ``wait`` seconds for
    another run's); when this process already holds it, join that lease. The one place that
    decides whether a run takes the lease: the command line calls it before it starts Prefect,
    and flows call it again, which then joins."""
    store = Store(out)
    key = _key(store)
    with _HELD_MUTEX:
        joined = _HELD.get(key)
    if joined is not None and joined.held:
        yield joined
        return
    lease = Lease(store, timeout=timeout, command=command, say=say).acquire(wait)
    with _HELD_MUTEX:
        _HELD[key] = lease
    try:
        yield lease
    finally:
        with _HELD_MUTEX:
            _HELD.pop(key, None)
        lease.release()


def release_all() -> None:
    """Release every lease this process holds (for an exit that cannot unwind normally)."""
    with _HELD_MUTEX:
        leases = list(_HELD.values())
        _HELD.clear()
    for lease in leases:
        with contextlib.suppress(Exception):
            lease.release()
