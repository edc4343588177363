"""Where one photo's time goes, for benchmarks: wall seconds per phase, denoiser work in FLOPs,
peak memory, and the GPU's dense 16-bit peak to compare the achieved rate with.

:func:`instrument` wraps a run's models so that every phase reports to a :class:`PhaseTimer`
(DINO, text encoding, UNet, VAE, the rest of the editor, CLIP scoring); the caller times I/O
and the whole photo, and what no phase claims is the learner and its glue (anchors, proposals,
region network, memo, selection, resizing and paste-back). Phases are *exclusive*: time in the
UNet is not also counted as editor time. On CUDA every phase boundary synchronises the device,
so asynchronous kernels are charged to the phase that queued them (a small cost: boundaries are
per UNet or VAE call, not per kernel). Nothing here is thread-safe: time one run at a time.
"""

from __future__ import annotations

import contextlib
import resource
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_map

PHASES = ("dino", "text", "unet", "vae", "editor_other", "clip", "learner", "io")

# Dense (no sparsity) tensor-core peak for fp16/bf16 inputs, TFLOP/s, from NVIDIA's data sheets
# (the sheets' headline figures are with 2:4 sparsity, twice these). Matched in order against
# torch.cuda.get_device_name(): the first name it contains wins.
DENSE_PEAK_TFLOPS = (
    ("H200 NVL", 835.5),
    ("H200", 989.5),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.5),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("RTX 8000", 130.5),  # Quadro RTX 8000, the reference implementation's GPU
)


def dense_peak_tflops(device: torch.device) -> float | None:
    """The GPU's dense fp16/bf16 tensor peak, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_PEAK_TFLOPS if key in name), None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------
class PhaseTimer:
    """Exclusive wall seconds per phase (a stack: entering a phase pauses the one around it),
    plus event counters."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._stack: list[str] = []
        self._since = 0.0
        self._deferred: list[Callable[[], None]] = []

    def reset(self) -> None:
        """Forget what was measured (between photos)."""
        self.seconds.clear()
        self.counts.clear()
        self._deferred.clear()

    def defer(self, work: Callable[[], None]) -> None:
        """Bookkeeping to do after the timed run (:meth:`settle`), so it costs the run nothing."""
        self._deferred.append(work)

    def settle(self) -> None:
        """Do the deferred bookkeeping (e.g. counting FLOPs); call once the clock is stopped."""
        for work in self._deferred:
            work()
        self._deferred.clear()

    def push(self, name: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._stack.append(name)
        self._since = now

    def pop(self) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[self._stack.pop()] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop()


# ----------------------------------------------------------------------------------------------
def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float | None:
    """FLOPs of ``fn(*args, **kwargs)`` by torch's FlopCounterMode, run on meta tensors (shapes
    only: no compute, no memory; ``fn`` must be a meta-device model's method). None when an op
    has no meta kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn(*tree_map(_meta, args), **tree_map(_meta, kwargs))
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return float(counter.get_total_flops())


class DenoiserFlops:
    """FLOPs of one denoiser call, counted on a weightless copy of the model on the meta device,
    once per input shape."""

    def __init__(self, module: torch.nn.Module) -> None:
        with torch.device("meta"):
            self.meta = type(module).from_config(module.config).eval()  # type: ignore[attr-defined]
        self._cache: dict[tuple, float | None] = {}

    def __call__(self, args: tuple, kwargs: dict) -> float | None:
        def shape(x: Any) -> Any:
            return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)

        key = (tuple(shape(a) for a in args), tuple(sorted((k, shape(v)) for k, v in kwargs.items())))
        if key not in self._cache:
            self._cache[key] = count_flops(self.meta, *args, **kwargs)
        return self._cache[key]


_FLOP_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _flop_counter(module: torch.nn.Module) -> DenoiserFlops:
    """One counter (and its per-shape cache) per model, however often it is instrumented."""
    if module not in _FLOP_COUNTERS:
        _FLOP_COUNTERS[module] = DenoiserFlops(module)
    return _FLOP_COUNTERS[module]


def _meta(x: Any) -> Any:
    """A tensor's shape and dtype without its data (anything else as it is)."""
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _batch(args: tuple, kwargs: dict) -> int:
    first = args[0] if args else next(iter(kwargs.values()))
    return int(first.shape[0])


@contextlib.contextmanager
def instrument(models: Any, timer: PhaseTimer) -> Iterator[Any]:
    """A copy of ``models`` (a :class:`~lregions_core.pipeline.Models`) whose parts report to
    ``timer``. Counters: ``unet_calls`` (batched forward passes), ``unet_samples`` (their batch
    sizes summed: each request counts twice under guidance), ``editor_calls``, ``requests``; and
    after :meth:`PhaseTimer.settle`, ``unet_flops`` (``unet_flops_missing`` counts the calls
    whose FLOPs could not be counted)."""
    from lregions_core.pipeline import Models

    undo: list[Callable[[], None]] = []
    try:
        features = _Timed(models.features, timer, "dino")
        scorer = _Timed(models.scorer, timer, "clip", ("prepare", "score"))
        editor = _Timed(models.editor, timer, "editor_other", ("edit",))
        _count_edits(editor, timer)
        clip_model = getattr(getattr(models.scorer, "bundle", None), "model", None)
        if clip_model is not None:
            undo.append(_patch(clip_model, "encode_text", timer, "text"))
        pipe = getattr(models.editor, "pipeline", None)
        if pipe is not None:
            undo.extend(_instrument_pipeline(pipe, timer))
        yield Models(features=features, scorer=scorer, editor=editor)  # type: ignore[arg-type]
    finally:
        for step in reversed(undo):
            step()


def _count_edits(editor: _Timed, timer: PhaseTimer) -> None:
    edit = editor.edit

    def counted(requests: Any) -> Any:
        timer.counts["editor_calls"] += 1
        timer.counts["requests"] += len(requests)
        return edit(requests)

    editor.edit = counted  # type: ignore[method-assign]


def _instrument_pipeline(pipe: Any, timer: PhaseTimer) -> list[Callable[[], None]]:
    undo: list[Callable[[], None]] = []
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    flops = _flop_counter(getattr(denoiser, "_orig_mod", denoiser))

    def count(args: tuple, kwargs: dict) -> None:
        counted = flops(args, kwargs)
        if counted is None:
            timer.counts["unet_flops_missing"] += 1
        else:
            timer.counts["unet_flops"] += counted

    def before(_module: Any, args: tuple, kwargs: dict) -> None:
        timer.counts["unet_calls"] += 1
        timer.counts["unet_samples"] += _batch(args, kwargs)
        shapes = tree_map(_meta, (args, kwargs))  # no memory, no compute: counted later
        timer.defer(lambda: count(*shapes))
        timer.push("unet")

    handles = [
        denoiser.register_forward_pre_hook(before, with_kwargs=True),
        denoiser.register_forward_hook(lambda *_: timer.pop()),
    ]
    for name in ("text_encoder", "text_encoder_2"):  # SDXL and FLUX have two
        text_encoder = getattr(pipe, name, None)
        if text_encoder is not None:
            handles.append(text_encoder.register_forward_pre_hook(lambda *_: timer.push("text")))
            handles.append(text_encoder.register_forward_hook(lambda *_: timer.pop()))
    undo.extend(handle.remove for handle in handles)
    for name in ("vae", "vqvae"):
        autoencoder = getattr(pipe, name, None)
        if autoencoder is not None:
            undo.extend(_patch(autoencoder, m, timer, "vae") for m in ("encode", "decode"))
    return undo


def _patch(obj: Any, method: str, timer: PhaseTimer, phase: str) -> Callable[[], None]:
    """Time ``obj.method`` as ``phase`` (an instance attribute over the class's method);
    returns the undo."""
    original = getattr(obj, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer.phase(phase):
            return original(*args, **kwargs)

    setattr(obj, method, timed)
    return lambda: delattr(obj, method) if method in vars(obj) else None


class _Timed:
    """A stand-in for a model part: ``methods`` (or the call itself) are timed as ``phase``;
    every other attribute is the wrapped object's."""

    def __init__(
        self, wrapped: Any, timer: PhaseTimer, phase: str, methods: tuple[str, ...] = ()
    ) -> None:
        self._wrapped = wrapped
        self._timer = timer
        self._phase = phase
        for method in methods:
            setattr(self, method, self._timed(getattr(wrapped, method)))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self._timer.phase(self._phase):
                return fn(*args, **kwargs)

        return timed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._wrapped)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


# ----------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak memory allocated by tensors since the last reset. CPU: the process's peak
    resident set size since it started (no reset exists; weights included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
