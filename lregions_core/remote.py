"""Reading http(s) URLs so that a batch survives the network: every remote read of an image or a
manifest given as an ``http://`` or ``https://`` URL goes through :func:`fetch`.

The retry policy is urllib3's :class:`~urllib3.util.Retry`: timeouts, refused or broken
connections, bodies cut off before their ``Content-Length`` and the answers 408, 429 and 5xx are
tried again, the first retry at once and then after ``backoff * 2**(n - 1)`` seconds plus up to
``backoff`` seconds of random jitter (at most ``backoff_max``), or after the server's
``Retry-After`` (at most ``retry_after_max``). Each kind of fault (connect, read, status) has
``retries`` retries. Other answers (404, 410, other 4xx) are not retried. What :func:`fetch`
cannot read raises :class:`FetchError`, which names the URL, the last status or error and the
number of requests made, and says whether the failure is *transient* (the network or the server
had a bad moment: a later run tries again; also an unresolvable host name) or permanent (an
answer such as 404, a TLS certificate error, too many redirects, a malformed URL).

Settings (:class:`HttpSettings`) come from ``LREGIONS_HTTP_*`` environment variables, read at
each call. They change how reads are done, never what is read, so no cache key includes them.

Thread safety: :func:`fetch` is called from many task threads at once. The process shares one
urllib3 ``PoolManager`` per per-host limit (urllib3's pools are thread-safe; connections are
reused across threads) and one ``threading.BoundedSemaphore`` per host and limit: a fetch holds
its host's semaphore for the whole fetch, retries and their waits included, so one process never
has more than ``per_host`` fetches of one host (scheme, host, port) in flight, and a host that
is struggling is not sent more requests while its fetches back off. Both registries are guarded
by one lock and emptied in a forked child (the parent's sockets and held semaphores are not the
child's).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
    SSLError,
)
from urllib3.util import Retry, Timeout

__all__ = ["FetchError", "HttpSettings", "error_kind", "fetch", "is_http"]

RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})
"""Answers that say "not now" rather than "no": tried again, and transient when they persist."""
MAX_REDIRECTS = 10

ENV = {  # HttpSettings field -> the environment variable that overrides its default
    "connect_timeout": "LREGIONS_HTTP_CONNECT_TIMEOUT",
    "read_timeout": "LREGIONS_HTTP_TIMEOUT",
    "retries": "LREGIONS_HTTP_RETRIES",
    "backoff": "LREGIONS_HTTP_BACKOFF",
    "backoff_max": "LREGIONS_HTTP_BACKOFF_MAX",
    "retry_after_max": "LREGIONS_HTTP_RETRY_AFTER_MAX",
    "per_host": "LREGIONS_HTTP_PER_HOST",
}


@dataclass(frozen=True)
class HttpSettings:
    """How :func:`fetch` reads: timeouts in seconds (``read_timeout`` is the longest wait for
    the next bytes, not for the whole body), retries per kind of fault, backoff in seconds and
    the number of fetches of one host in flight per process."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: int = 60
    per_host: int = 8

    @classmethod
    def from_env(cls) -> HttpSettings:
        """The defaults overridden by whichever ``LREGIONS_HTTP_*`` variables are set; a value
        that is not a number in range (timeouts and ``per_host`` above 0, the others at least 0)
        raises ValueError naming the variable."""
        values = {}
        for field, var in ENV.items():
            raw = os.environ.get(var, "").strip()
            if not raw:
                continue
            kind = type(getattr(cls, field))
            positive = field in ("connect_timeout", "read_timeout", "per_host")
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or not math.isfinite(value) or value < 0 or (positive and not value):
                raise ValueError(f"{var} must be {'an integer' if kind is int else 'a number'} "
                                 f"{'> 0' if positive else '>= 0'}, got {raw!r}")
            values[field] = value
        return cls(**values)


class FetchError(OSError):
    """A URL that :func:`fetch` could not read: ``problem`` (the last status or error),
    ``status`` (the last HTTP status, or None), ``tries`` (requests made) and ``transient``."""

    def __init__(self, url: str, problem: str, status: int | None, tries: int,
                 transient: bool) -> None:
        self.url, self.problem, self.status = url, problem, status
        self.tries, self.transient = tries, transient
        super().__init__(f"cannot fetch {url}: {self.detail}")

    @property
    def detail(self) -> str:
        """The problem, the number of tries and, when transient, that a later run tries again."""
        tries = "1 try" if self.tries == 1 else f"{self.tries} tries"
        note = "; transient: the next run tries again" if self.transient else ""
        return f"{self.problem} ({tries}{note})"

    def __reduce__(self):  # keep the constructor's arguments through pickling (worker processes)
        return (type(self), (self.url, self.problem, self.status, self.tries, self.transient))


def is_http(location: str) -> bool:
    """Whether ``location`` is an ``http://`` or ``https://`` URL (read by :func:`fetch`)."""
    return location[:8].lower().startswith(("http://", "https://"))


def error_kind(exc: BaseException) -> str:
    """``"transient"`` for a failure that a later run may not meet (an exception with a true
    ``transient`` attribute, such as a :class:`FetchError` after every try), else ``"data"``."""
    return "transient" if getattr(exc, "transient", False) is True else "data"


class _Retry(Retry):
    """urllib3's Retry that records, on the MaxRetryError it raises when the retries are used
    up, how many requests were made (``tries``): the history it keeps is otherwise lost."""

    def increment(self, *args, **kwargs):
        try:
            return super().increment(*args, **kwargs)
        except MaxRetryError as exc:
            exc.tries = len(self.history) + 1  # the earlier requests and this one
            raise


_lock = threading.Lock()
_managers: dict[int, urllib3.PoolManager] = {}
_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}


def _forget_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _managers.clear()
    _slots.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _manager(per_host: int) -> urllib3.PoolManager:
    with _lock:
        if per_host not in _managers:
            _managers[per_host] = urllib3.PoolManager(num_pools=64, maxsize=per_host)
        return _managers[per_host]


def _slot(url: str, per_host: int) -> threading.BoundedSemaphore:
    parts = urlsplit(url)
    host = f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{parts.port or ''}"
    with _lock:
        return _slots.setdefault((host, per_host), threading.BoundedSemaphore(per_host))


def _status_text(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _error_text(error: BaseException | None, settings: HttpSettings) -> tuple[str, bool]:
    """(what went wrong, transient) for the error behind a failed request."""
    if isinstance(error, NameResolutionError):
        return f"cannot resolve the host name ({error.__cause__ or error})", True
    if isinstance(error, NewConnectionError):
        cause = error.__cause__ or error
        return f"cannot connect ({getattr(cause, 'strerror', None) or cause})", True
    if isinstance(error, ConnectTimeoutError):
        return f"connect timed out after {settings.connect_timeout:g} s", True
    if isinstance(error, ReadTimeoutError):
        return f"no data for {settings.read_timeout:g} s (read timed out)", True
    if isinstance(error, ProtocolError):
        cut = next((a for a in error.args if hasattr(a, "partial")), None)
        if cut is not None and isinstance(getattr(cut, "expected", None), int):
            got = cut.partial if isinstance(cut.partial, int) else len(cut.partial)
            return (f"body cut off after {got} bytes, {cut.expected} more announced "
                    "(Content-Length)"), True
        return f"connection broken ({error.args[0] if error.args else error})", True
    if isinstance(error, SSLError):
        return f"TLS error: {error}", False
    if isinstance(error, ResponseError):  # too many redirects
        return str(error), False
    return f"{type(error).__name__}: {error}", True


def fetch(url: str, settings: HttpSettings | None = None) -> bytes:
    """The body of ``url`` (http or https), read with the timeouts, retries and per-host limit
    of ``settings`` (default: :meth:`HttpSettings.from_env`). Raises :class:`FetchError`."""
    s = settings or HttpSettings.from_env()
    retry = _Retry(
        total=None, connect=s.retries, read=s.retries, status=s.retries, other=s.retries,
        redirect=MAX_REDIRECTS, status_forcelist=RETRY_STATUSES, backoff_factor=s.backoff,
        backoff_jitter=s.backoff, backoff_max=s.backoff_max, retry_after_max=s.retry_after_max,
        raise_on_status=False,
    )
    timeout = Timeout(connect=s.connect_timeout, read=s.read_timeout)
    with _slot(url, s.per_host):
        try:
            response = _manager(s.per_host).request(
                "GET", url, retries=retry, timeout=timeout, preload_content=True)
        except MaxRetryError as exc:
            problem, transient = _error_text(exc.reason, s)
            raise FetchError(url, problem, None, getattr(exc, "tries", 1), transient) from None
        except (HTTPError, OSError, ValueError) as exc:  # not retried: a malformed URL and such
            raise FetchError(url, f"{type(exc).__name__}: {exc}", None, 1, False) from None
    if 200 <= response.status < 300:
        return response.data
    tries = len(response.retries.history) + 1 if response.retries else 1
    raise FetchError(url, _status_text(response.status), response.status, tries,
                     response.status in RETRY_STATUSES)
