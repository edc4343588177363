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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server (moto's server mode) on 127.0.0.1, recording requests, with the
    environment the batch needs to reach it (``FSSPEC_S3_ENDPOINT_URL`` and dummy credentials).
    Yields the endpoint URL; fsspec's configuration points s3:// at it for this process too."""
    import subprocess
    import sys

    from servers import free_port, stop, wait_for_http

    fsspec_config = pytest.importorskip("fsspec.config", reason="fsspec missing")
    pytest.importorskip("s3fs", reason="s3fs missing (pip install s3fs)")
    pytest.importorskip("moto.server", reason="moto missing (pip install 'moto[server]')")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "lregions-test", "AWS_SECRET_ACCESS_KEY": "lregions-test",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
    folder = tmp_path_factory.mktemp("moto")
    log = open(folder / "moto.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        # the recorder writes its file into the working directory unless told where
        env={**os.environ, **env, "MOTO_ENABLE_RECORDING": "True",
             "MOTO_RECORDER_FILEPATH": str(folder / "recording")},
        stdout=log, stderr=log, start_new_session=True)
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec_config.conf.get("s3")
    try:
        wait_for_http(f"{endpoint}/moto-api/", 60, server)
        os.environ.update(env)
        fsspec_config.conf["s3"] = {"endpoint_url": endpoint}
        yield endpoint
    finally:
        stop(server)
        log.close()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_conf is None:
            fsspec_config.conf.pop("s3", None)
        else:
            fsspec_config.conf["s3"] = saved_conf
