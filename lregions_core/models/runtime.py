"""Device and dtype for a config, and scoped seeding of torch's random generator.

Thread safety: :func:`seeded` is serialised. torch's global CPU generator is one per process, so
two threads that each seeded it and drew from it at the same time would draw from each other's
streams (a region network initialised, or CLIP's augmented views drawn, from another photo's
seed). Every block that seeds the global generator holds one process-wide lock while it runs;
code that draws random numbers outside such a block must use a ``torch.Generator`` of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lregions_core.config import Config
from lregions_core.loading import PROCESS_LOCK

RANDOM_INIT_SEED = 0  # random weights are the same in every process (restartable runs agree)
# Held while the global generator is seeded. It is the lock of first imports and model loads
# (re-entrant): model builds seed inside it, and a seeded block that imports or loads cannot
# take two locks in the other order, so no lock order can deadlock. A seeded block may thus wait
# for another thread's model load, once per process and model.
_GLOBAL_RNG = PROCESS_LOCK


@contextlib.contextmanager
def seeded(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Run the block with torch's global generator seeded, then restore the caller's state:
    reproducible random initialisations and augmentations without disturbing anyone else.
    Serialised across threads (see the module docstring): keep the block short."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def resolve_device(config: Config) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(config: Config) -> torch.dtype:
    """float16 on CUDA by default (the editors' and CLIP's usual precision), float32 on CPU."""
    if config.dtype != "auto":
        try:
            return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
                config.dtype
            ]
        except KeyError:
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {config.dtype!r}")
    return torch.float16 if resolve_device(config).type == "cuda" else torch.float32
