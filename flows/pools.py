"""Work pool names and the batch's own error: plain values the command line needs before (and
without) importing Prefect."""

from __future__ import annotations

import re

from lregions_core.config import ConfigError

DEFAULT_POOL = "lregions-gpu"  # GPU workers run shards from this pool
COORDINATOR_POOL = "lregions-coordinator"  # scheduled coordinators run from this one
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class BatchError(RuntimeError):
    """The batch could not go on (no worker, no server, a failed deploy); the message says what
    to do next."""


def check_pool_name(pool: str) -> str:
    """``pool`` when it is a valid work pool name, else a usage error."""
    if not POOL_NAME.fullmatch(pool):
        raise ConfigError(f"bad work pool name {pool!r}: use letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit, at most 63 characters")
    return pool
