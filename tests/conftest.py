"""Shared test settings: one torch thread (tiny models gain nothing from more, and on small shared
machines spinning threads made tiny ops 10-100x slower), and ``slow`` tests (real-size models)
skipped unless ``LREGIONS_SLOW=1``."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LREGIONS_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="real-size models: set LREGIONS_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
