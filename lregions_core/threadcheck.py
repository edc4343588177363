"""Checking that a component gives every caller its own result when threads share it.

The batch runs its stages in several task threads that share one loaded model per component.
A component that keeps per-call state on a shared module (a hook, a cache filled in the wrong
order, a seeded global generator) can hand one photo's result to another photo's call, silently.
:func:`concurrent_mismatches` makes that visible: it calls ``call(i)`` once per input alone, one
at a time, then from ``threads`` threads at once (each thread on its own input, ``calls`` times,
all released together), and returns every concurrent result that differs from the lone one.

"Differs" is exact (:func:`same`): on the CPU the components here give the same bits for the
same input whatever else runs beside them, so any difference is a wrong result. Used by the
tests of every registered component and by ``benchmarks/bench_threads.py``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


def comparable(value: Any) -> Any:
    """``value`` as nested lists/dicts of numpy arrays and plain values (images, tensors and
    dataclass-like records included), for :func:`same`."""
    if isinstance(value, Image.Image):
        return np.asarray(value)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if hasattr(value, "__dict__"):
        return comparable(vars(value))
    return value


def same(a: Any, b: Any) -> bool:
    """Whether two results are equal to the bit (NaN equal to NaN; shapes must match)."""
    a, b = comparable(a), comparable(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@dataclass
class Mismatch:
    """One concurrent call whose result was not the lone call's: thread ``input``'s ``call``-th
    call, and what it gave instead (an exception's text, or "another result")."""

    input: int
    call: int
    got: str


def run_together(call: Callable[[int], Any], threads: int, calls: int,
                 lock: threading.Lock | None = None) -> tuple[list[list[Any]], float]:
    """``call(i)`` ``calls`` times in each of ``threads`` threads (thread ``i`` on input ``i``),
    all released at once; with ``lock``, each call holds it (serialised). Returns each
    thread's results (an exception stands for its call) and the wall-clock seconds."""
    barrier = threading.Barrier(threads)
    results: list[list[Any]] = [[] for _ in range(threads)]

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(calls):
            try:
                if lock is None:
                    results[i].append(call(i))
                else:
                    with lock:
                        results[i].append(call(i))
            except Exception as exc:  # noqa: BLE001 - reported as a mismatch
                results[i].append(exc)

    pool = [threading.Thread(target=work, args=(i,), name=f"threadcheck-{i}")
            for i in range(threads)]
    start = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return results, time.perf_counter() - start


def concurrent_mismatches(call: Callable[[int], Any], threads: int, calls: int
                          ) -> list[Mismatch]:
    """Every concurrent result of ``call`` that is not the lone call's (see the module
    docstring). ``call(i)`` must be a pure function of ``i`` when run alone."""
    alone = [call(i) for i in range(threads)]
    results, _ = run_together(call, threads, calls)
    wrong = []
    for i, found in enumerate(results):
        for n, result in enumerate(found):
            if isinstance(result, Exception):
                wrong.append(Mismatch(i, n, f"{type(result).__name__}: {result}"))
            elif not same(result, alone[i]):
                wrong.append(Mismatch(i, n, "another result"))
    return wrong
