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


def noise_image(width: int, height: int, seed: int = 0):
    """A reproducible RGB noise image (import with ``from conftest import noise_image``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache. The hub reads its settings at import time, so
    patching the environment alone is not enough."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole test session (starting one costs ~25 s)."""
    from flows.cli import prefect_defaults

    prefect_defaults()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium's connections are refused on a closed network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def render_in_chromium(page_path, screenshot):
    """Open a local HTML page in Debian's headless Chromium (skip, saying why, without it).
    Returns ([{src, ok}] per <img>, number of <script> elements, every URL requested)."""
    from pathlib import Path

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} missing (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright missing (pip install 'playwright>=1.50')")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "() => Array.from(document.images).map(i => ({src: i.getAttribute('src'),"
                " ok: i.complete && i.naturalWidth > 0}))")
            scripts = page.evaluate("() => document.querySelectorAll('script').length")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return images, scripts, requests
