"""Thread-safe first use of heavy libraries and models, once per process.

Why this exists: Python's import system takes one lock per module. When two threads import
modules that import each other for the first time at the same moment (``torchvision.ops`` and
``torchvision.models`` do; open_clip, timm and lpips pull them in), Python detects the deadlock
and raises ``deadlock detected by _ModuleLock(...)`` in one of the threads, and a batch row fails
for no reason of its own. Building a model from two threads at once also builds it twice.

So every lazy import of a heavy library in ``lregions_core`` goes through :func:`heavy_import`,
and every model build through a :func:`load_once` function. Both take one process-wide lock:
the first thread does the work and the others wait for it, then use its result. Once a module is
imported or a model loaded, callers take a lock-free fast path, so a thread that only *uses*
torchvision never waits for another thread's (slow) model load.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int

# Re-entrant: a model build imports heavy libraries, and may build other models. Also held by
# lregions_core.models.runtime.seeded while torch's global generator is seeded.
PROCESS_LOCK = _LOCK = threading.RLock()


def _ready(module: ModuleType | None) -> bool:
    """True when ``module`` exists and has finished executing (not a half-imported module that
    another thread is still running)."""
    if module is None:
        return False
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False)


def heavy_import(name: str) -> ModuleType:
    """``importlib.import_module(name)``, serialised with every other first import and model
    load of this process (see the module docstring)."""
    module = sys.modules.get(name)
    if _ready(module):
        return module  # type: ignore[return-value]
    with _LOCK:
        return importlib.import_module(name)


def load_once(maxsize: int = 4) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: cache a loader's result per (hashable) arguments, keeping the ``maxsize`` most
    recently used. Unlike :func:`functools.lru_cache`, concurrent callers with the same
    arguments wait for one load instead of each running it."""

    def decorate(load: Callable[..., T]) -> Callable[..., T]:
        cache: OrderedDict[tuple, Any] = OrderedDict()
        loads = [0]  # how many times ``load`` ran (the cache's misses)

        @functools.wraps(load)
        def once(*args: Any) -> T:
            try:
                return cache[args]  # fast path: no lock once loaded
            except KeyError:
                pass
            with _LOCK:
                if args not in cache:
                    loads[0] += 1
                    cache[args] = load(*args)
                    while len(cache) > maxsize:
                        cache.popitem(last=False)
                else:
                    cache.move_to_end(args)
                return cache[args]

        def cache_clear() -> None:
            with _LOCK:
                cache.clear()
                loads[0] = 0

        def cache_info() -> CacheInfo:
            """Like :func:`functools.lru_cache`'s (``hits`` is not counted: always 0)."""
            return CacheInfo(0, loads[0], maxsize, len(cache))

        once.cache_clear = cache_clear  # type: ignore[attr-defined]
        once.cache_info = cache_info  # type: ignore[attr-defined]
        return once

    return decorate
