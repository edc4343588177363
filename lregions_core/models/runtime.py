"""Device and dtype for a config, and scoped seeding of torch's random generator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lregions_core.config import Config

RANDOM_INIT_SEED = 0  # random weights are the same in every process (restartable runs agree)


@contextlib.contextmanager
def seeded(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Run the block with torch's global generator seeded, then restore the caller's state:
    reproducible random initialisations and augmentations without disturbing anyone else."""
    with torch.random.fork_rng(devices=[]):
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
