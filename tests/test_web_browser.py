"""The page in a real browser: the distribution's headless Chromium driven by Playwright.

Uploads the sample photo and a file that is no photo, protects, downloads the result and
checks its L-infinity on disk, runs the check step, saves a screenshot as a test artefact
(``ANTI_I2V_ARTIFACTS``, default ``build/test-artifacts``), then stops the server and checks
that its temporary folder is gone. Skipped when no Chromium is installed, unless
``ANTI_I2V_REQUIRE_BROWSER`` is set (CI sets it: there the test must run).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anti_i2v.api import sample_photo

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, (os.environ.get("ANTI_I2V_CHROMIUM"), shutil.which("chromium"),
                              shutil.which("chromium-browser"))), None)


@pytest.fixture(scope="module")
def sync_api():
    """Playwright's sync API and a Chromium to drive; missing ones skip the test, or fail it where
    ``ANTI_I2V_REQUIRE_BROWSER`` says it must run."""
    missing = pytest.fail if os.environ.get("ANTI_I2V_REQUIRE_BROWSER") else pytest.skip
    if CHROMIUM is None:
        missing("no Chromium found: install the distribution's chromium package (apt install chromium)")
    try:
        from playwright import sync_api as api
    except ImportError:
        missing("Playwright's Python package is missing: pip install -e '.[test]'")
    return api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`anti-i2v serve` on the tiny model in its own process; yields (url, its temporary folder)."""
    parent = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "anti_i2v.cli", "serve", "--model", "tiny-cogvideox", "--port", str(_free_port()),
         "--temp-dir", str(parent), "--check-steps", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    url = None
    while url is None:
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            process.kill()
            pytest.fail("the server did not start within 120 s")
        if "page at " in line:
            url = line.split("page at ", 1)[1].split()[0]
    folders = list(parent.glob("anti-i2v-serve-*"))
    yield url, folders, process
    if process.poll() is None:
        process.kill()


def test_protect_download_and_bad_upload_in_a_real_browser(sync_api, server, tmp_path):
    url, folders, process = server
    assert url.startswith("http://127.0.0.1:") and len(folders) == 1  # localhost only, one private folder
    bad = tmp_path / "holiday.png"
    bad.write_text("this is not a photo")
    artefacts = Path(os.environ.get("ANTI_I2V_ARTIFACTS", REPO / "build" / "test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400}, accept_downloads=True)
        page.goto(url)
        page.set_input_files("#uploads input[type=file]", [str(sample_photo()), str(bad)])
        sync_api.expect(page.locator("#uploads")).to_contain_text("holiday", timeout=60_000)
        page.get_by_label("fast", exact=False).check()
        page.click("#protect")
        page.locator("#downloads a").first.wait_for(timeout=300_000)
        status = page.inner_text("#status")
        assert "1 of 2 photo(s) protected" in status and "holiday.png" in status and "not an image" in status
        with page.expect_download() as download:
            page.locator("#downloads tr", has_text="sample_protected").locator("a").click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        with page.expect_download() as download:
            page.locator("#downloads tr", has_text="anti-i2v-protected").locator("a").click()
        download.value.save_as(tmp_path / "all.zip")
        page.get_by_text("Check it").click()
        page.click("#check")
        page.locator("#verdict h3").wait_for(timeout=300_000)
        verdict = page.inner_text("#verdict")
        page.screenshot(path=str(artefacts / "serve-page.png"), full_page=True)
        browser.close()
    protected = np.asarray(Image.open(saved).convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(sample_photo()).convert("RGB"), dtype=np.int16)
    assert protected.shape == original.shape and 0 < np.abs(protected - original).max() <= 8
    with zipfile.ZipFile(tmp_path / "all.zip") as archive:
        assert sorted(archive.namelist()) == ["sample_protected.json", "sample_protected.png"]
    assert "Verdict for sample.jpg" in verdict and "random weights" in verdict
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not folders[0].exists()  # uploads and results deleted with the server
