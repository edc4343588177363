"""Reading http(s) URLs so that a batch survives the network: every remote read of an image or a
manifest given as an ``http://`` or ``https://`` URL goes through :func:`fetch`.

The retry policy is urllib3's :class:`~urllib3.util.Retry`: timeouts, refused or broken
connections, bodies cut off before their ``Content-Length`` and the answers 408, 429 and 5xx are
tried again, the first retry at once and then after ``backoff * 2**(n - 1)`` seconds plus up to
``backoff`` seconds of random jitter (at most ``backoff_max``), or after the server's
``Retry-After`` (at most ``retry_after_max``; a ``Retry-After`` that is neither whole seconds nor
an HTTP date is ignored: the backoff applies). Each kind of fault (connect, read, status) has
``retries`` retries. Other answers (404, 410, other 4xx) are not retried. The body is read in
chunks of at most :data:`CHUNK` bytes: a body longer than ``max_bytes`` fails at once, and a
fetch whose requests, waits and body have taken ``total_timeout`` seconds gives up (a request
or a read under way then ends within its own timeout). What :func:`fetch` cannot read raises
:class:`FetchError`, which names the URL, the last status or error and the number of requests
made, and says whether the failure is *transient* (the network or the server had a bad moment:
a later run tries again; also an unresolvable host name, a TLS handshake cut short and a fetch
out of time) or permanent (an answer such as 404, a TLS certificate that fails verification,
too many redirects, a malformed URL, a body over ``max_bytes``).

Settings (:class:`HttpSettings`) come from ``LREGIONS_HTTP_*`` environment variables, read at
each call; :func:`check_settings` checks them once, at the start of a run. They change how reads
are done, never what is read, so no cache key includes them.

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
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    InvalidHeader,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
    SSLError,
)
from urllib3.util import Retry, Timeout, parse_url
from urllib3.util.ssl_match_hostname import CertificateError

__all__ = ["FetchError", "HttpSettings", "SettingsError", "check_settings", "error_kind", "fetch",
           "is_http"]

RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})
"""Answers that say "not now" rather than "no": tried again, and transient when they persist."""
MAX_REDIRECTS = 10
CHUNK = 64 * 1024
"""The most bytes of a body read at once: the total time limit and the size limit are checked
between chunks."""
DEFAULT_PORTS = {"http": 80, "https": 443}

ENV = {  # HttpSettings field -> the environment variable that overrides its default
    "connect_timeout": "LREGIONS_HTTP_CONNECT_TIMEOUT",
    "read_timeout": "LREGIONS_HTTP_TIMEOUT",
    "retries": "LREGIONS_HTTP_RETRIES",
    "backoff": "LREGIONS_HTTP_BACKOFF",
    "backoff_max": "LREGIONS_HTTP_BACKOFF_MAX",
    "retry_after_max": "LREGIONS_HTTP_RETRY_AFTER_MAX",
    "per_host": "LREGIONS_HTTP_PER_HOST",
    "total_timeout": "LREGIONS_HTTP_TOTAL_TIMEOUT",
    "max_bytes": "LREGIONS_HTTP_MAX_BYTES",
}
POSITIVE = frozenset({"connect_timeout", "read_timeout", "per_host", "total_timeout",
                      "max_bytes"})
"""The settings that must be above 0 (the others must be at least 0)."""


class SettingsError(ValueError):
    """An ``LREGIONS_HTTP_*`` variable whose value is not a valid setting; the message names the
    variable, what it must be and its value."""


@dataclass(frozen=True)
class HttpSettings:
    """How :func:`fetch` reads: timeouts in seconds (``read_timeout`` is the longest wait for
    the next bytes, not for the whole body; ``total_timeout`` the longest a fetch may take,
    retries and waits included), retries per kind of fault, backoff in seconds, the number of
    fetches of one host in flight per process and the largest body accepted, in bytes."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: int = 60
    per_host: int = 8
    total_timeout: float = 300.0
    max_bytes: int = 256 * 2**20

    @classmethod
    def from_env(cls) -> HttpSettings:
        """The defaults overridden by whichever ``LREGIONS_HTTP_*`` variables are set; a value
        that is not a number in range (timeouts, ``per_host`` and ``max_bytes`` above 0, the
        others at least 0) raises :class:`SettingsError` naming the variable and its value."""
        values = {}
        for field, var in ENV.items():
            raw = os.environ.get(var, "").strip()
            if not raw:
                continue
            kind = type(getattr(cls, field))
            positive = field in POSITIVE
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or not math.isfinite(value) or value < 0 or (positive and not value):
                raise SettingsError(f"{var} must be {'an integer' if kind is int else 'a number'} "
                                    f"{'> 0' if positive else '>= 0'}, got {raw!r}")
            values[field] = value
        return cls(**values)


def check_settings() -> HttpSettings:
    """The settings the ``LREGIONS_HTTP_*`` variables give (:meth:`HttpSettings.from_env`),
    for a run to check once before it reads anything: every :func:`fetch` reads them again and
    raises the same :class:`SettingsError` when one is invalid."""
    return HttpSettings.from_env()


class FetchError(OSError):
    """A URL that :func:`fetch` could not read: ``problem`` (the last status or error),
    ``status`` (the last HTTP status, or None), ``tries`` (requests made: 0 for a malformed URL)
    and ``transient``."""

    def __init__(self, url: str, problem: str, status: int | None, tries: int,
                 transient: bool) -> None:
        self.url, self.problem, self.status = url, problem, status
        self.tries, self.transient = tries, transient
        super().__init__(f"cannot fetch {url}: {self.detail}")

    @property
    def detail(self) -> str:
        """The problem, the number of tries and, when transient, that a later run tries again."""
        tries = {0: "no request made", 1: "1 try"}.get(self.tries, f"{self.tries} tries")
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


class _Progress:
    """What one fetch has done, shared by the :class:`_Retry` objects of that fetch (each retry
    makes a new one): ``tries`` (requests made or under way) and ``deadline`` (the monotonic
    time by which the fetch ends)."""

    __slots__ = ("deadline", "tries")

    def __init__(self, deadline: float) -> None:
        self.deadline, self.tries = deadline, 0


class _OutOfTime(Exception):
    """The wait before the next try would end after the fetch's deadline; ``last`` is the
    history entry (error or status) of the last request."""

    def __init__(self, last) -> None:
        super().__init__("no time left for another try")
        self.last = last


class _Retry(Retry):
    """urllib3's Retry that counts the requests of one fetch in ``progress`` (its history is
    otherwise lost with the exception that ends the retries), gives up at once on a TLS
    certificate that fails verification, ignores a ``Retry-After`` it cannot parse (the backoff
    applies) and raises :class:`_OutOfTime` rather than wait past the fetch's deadline."""

    progress: _Progress | None = None

    def new(self, **kw):
        retry = super().new(**kw)
        retry.progress = self.progress
        return retry

    def _count(self, tries: int) -> None:
        if self.progress is not None:
            self.progress.tries = tries

    def increment(self, method=None, url=None, response=None, error=None, _pool=None,
                  _stacktrace=None):
        try:
            if error is not None and _certificate_failure(error):  # trying again cannot help
                raise MaxRetryError(_pool, url, error)  # type: ignore[arg-type]
            retry = super().increment(method, url, response, error, _pool, _stacktrace)
        except BaseException:
            self._count(len(self.history) + 1)  # the earlier requests and this one
            raise
        retry._count(len(retry.history) + 1)  # the requests made and the next one
        return retry

    def parse_retry_after(self, retry_after: str) -> float | None:  # type: ignore[override]
        """Seconds to wait from a ``Retry-After`` value, or None (use the backoff) when it is
        neither whole seconds nor an HTTP date."""
        try:
            return super().parse_retry_after(retry_after)
        except (InvalidHeader, ValueError, OverflowError):
            return None

    def sleep(self, response=None) -> None:
        """Wait before the next try: the answer's ``Retry-After`` if any, else the backoff."""
        try:
            wait = None
            if response is not None and self.respect_retry_after_header:
                wait = self.get_retry_after(response)
            wait = wait or self.get_backoff_time()
            if self.progress is not None and time.monotonic() + wait > self.progress.deadline:
                raise _OutOfTime(self.history[-1] if self.history else None)
        except BaseException:
            self._count(len(self.history))  # the next request is not made
            raise
        if wait > 0:
            time.sleep(wait)


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


def _host_key(url: str) -> str:
    """``scheme://host:port`` of an http(s) URL, with the scheme's default port when it has none
    (``http://h`` and ``http://h:80`` are one host); ValueError for a malformed URL."""
    parts = parse_url(url)  # the parser urllib3 requests with: LocationParseError (ValueError)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"not an http or https URL (scheme {parts.scheme!r})")
    if not parts.host:
        raise ValueError("no host")
    return f"{parts.scheme}://{parts.host.lower()}:{parts.port or DEFAULT_PORTS[parts.scheme]}"


def _slot(host: str, per_host: int) -> threading.BoundedSemaphore:
    with _lock:
        return _slots.setdefault((host, per_host), threading.BoundedSemaphore(per_host))


def _status_text(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _certificate_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from a TLS certificate that failed verification (unknown issuer,
    expired, another host's name), looking through the errors it wraps; a handshake cut short
    (reset, unexpected EOF) is not one."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        exc = todo.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, (ssl.SSLCertVerificationError, CertificateError)):
            return True
        todo.extend(a for a in exc.args if isinstance(a, BaseException))
        todo.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return False


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
        return f"TLS error: {error}", not _certificate_failure(error)
    if isinstance(error, ResponseError):  # too many redirects
        return str(error), False
    return f"{type(error).__name__}: {error}", True


def _last_problem(last, settings: HttpSettings) -> str:
    """What went wrong in a request, from its Retry history entry."""
    if last is not None and last.status is not None:
        return _status_text(last.status)
    if last is not None and last.error is not None:
        return _error_text(last.error, settings)[0]
    return "no answer"


def _read_body(url: str, response, settings: HttpSettings, progress: _Progress) -> bytes:
    """The body of a 2xx ``response``, read chunk by chunk within the fetch's deadline and the
    size limit (FetchError otherwise); a body cut off or stalled raises urllib3's error."""
    limit = settings.max_bytes
    announced = response.length_remaining  # Content-Length, None when not given
    if announced is not None and announced > limit:
        raise FetchError(url, f"body of {announced} bytes (Content-Length) is larger than "
                         f"{limit} bytes (LREGIONS_HTTP_MAX_BYTES)", response.status,
                         progress.tries, False)
    body = bytearray()
    while True:
        if time.monotonic() > progress.deadline and not response.isclosed():
            raise FetchError(url, f"body not read within {settings.total_timeout:g} s "
                             f"(LREGIONS_HTTP_TOTAL_TIMEOUT; {len(body)} bytes read)",
                             response.status, progress.tries, True)
        chunk = response.read1(CHUNK)  # at most one read from the socket (read_timeout)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise FetchError(url, f"body larger than {limit} bytes (LREGIONS_HTTP_MAX_BYTES)",
                             response.status, progress.tries, False)


def _get(url: str, retry: _Retry, settings: HttpSettings, progress: _Progress) -> bytes:
    """The body of ``url``: urllib3 retries failed connections and answers, this loop a body
    cut off or stalled, with the same Retry (counts, backoff, deadline)."""
    s = settings
    timeout = Timeout(connect=min(s.connect_timeout, s.total_timeout),
                      read=min(s.read_timeout, s.total_timeout))
    while True:
        response = _manager(s.per_host).request(
            "GET", url, retries=retry, timeout=timeout, preload_content=False)
        retry = response.retries or retry
        try:
            if not 200 <= response.status < 300:
                raise FetchError(url, _status_text(response.status), response.status,
                                 progress.tries, response.status in RETRY_STATUSES)
            return _read_body(url, response, s, progress)
        except (ProtocolError, ReadTimeoutError, SSLError) as exc:
            error = exc
        finally:
            if not response.isclosed():  # not read to its end: the connection is not reusable
                response.close()
            response.release_conn()
        retry = retry.increment("GET", url, error=error, _stacktrace=error.__traceback__)
        retry.sleep()


def fetch(url: str, settings: HttpSettings | None = None) -> bytes:
    """The body of ``url`` (http or https), read with the timeouts, retries, limits and per-host
    limit of ``settings`` (default: :meth:`HttpSettings.from_env`, which raises
    :class:`SettingsError`). Raises :class:`FetchError`."""
    s = settings or HttpSettings.from_env()
    try:
        host = _host_key(url)
    except ValueError as exc:
        raise FetchError(url, f"malformed URL ({exc})", None, 0, False) from None
    retry = _Retry(
        total=None, connect=s.retries, read=s.retries, status=s.retries, other=s.retries,
        redirect=MAX_REDIRECTS, status_forcelist=RETRY_STATUSES, backoff_factor=s.backoff,
        backoff_jitter=s.backoff, backoff_max=s.backoff_max, retry_after_max=s.retry_after_max,
        raise_on_status=False,
    )
    with _slot(host, s.per_host):
        progress = retry.progress = _Progress(time.monotonic() + s.total_timeout)
        progress.tries = 1
        try:
            return _get(url, retry, s, progress)
        except FetchError:
            raise
        except MaxRetryError as exc:
            problem, transient = _error_text(exc.reason, s)
            raise FetchError(url, problem, None, progress.tries, transient) from None
        except _OutOfTime as exc:
            problem = (f"{_last_problem(exc.last, s)}; no time left to try again within "
                       f"{s.total_timeout:g} s (LREGIONS_HTTP_TOTAL_TIMEOUT)")
            raise FetchError(url, problem, None, progress.tries, True) from None
        except InvalidHeader as exc:  # a header urllib3 cannot use: the server's bad moment
            raise FetchError(url, f"InvalidHeader: {exc}", None, progress.tries, True) from None
        except (HTTPError, OSError, ValueError) as exc:  # not retried: a bad redirect and such
            raise FetchError(url, f"{type(exc).__name__}: {exc}", None, progress.tries,
                             False) from None
