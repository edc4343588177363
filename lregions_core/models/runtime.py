"""Device and dtype for a config, and one loaded copy of each model per process."""

from __future__ import annotations

import torch

from lregions_core.config import Config


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
