"""End to end in a real headless Chromium: the page uploads a photo, shows the overlay and the legend, toggles views.

The browser is Debian's ``chromium`` package (installed here with apt-get when missing and we are root), driven by
Playwright for Python with ``executable_path="/usr/bin/chromium"`` — never ``playwright install``. Screenshots are
written to ``$CRFASRNN_TEST_ARTIFACTS`` when set, else to pytest's temporary folder (the path is printed; run with -s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")

from PIL import Image
from playwright import sync_api
from serve_helpers import LiveServer

from crfasrnn.demo import DEMO_CLASSES
from crfasrnn.image import bundled_annotation_path, bundled_photo_path
from crfasrnn.serve import Engine, Limits, create_app

CHROMIUM = Path("/usr/bin/chromium")
APT_PACKAGES = ["chromium", "fonts-dejavu-core"]


def _install_chromium() -> str | None:
    """Install Debian's chromium with apt-get; return None on success, else why it could not be installed."""
    if not shutil.which("apt-get"):
        return "apt-get is not available (not a Debian-like system)"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install the chromium package (install it: apt-get install chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=600",
        *APT_PACKAGES,
    ]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200, check=False)
    if result.returncode != 0:  # the package lists may be missing or stale: refresh them once and retry
        subprocess.run(
            ["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,  # a failed refresh shows in the retried install's result
        )
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200, check=False)
    if result.returncode != 0 or not CHROMIUM.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install chromium failed ({tail[0]})"
    return None


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        reason = _install_chromium()
        if reason:
            pytest.skip(f"headless Chromium unavailable: {reason}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("CRFASRNN_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return page, errors


def _wait_for_result(page, view: str) -> dict:
    page.wait_for_function(
        """(view) => {
            const img = document.getElementById('overlay-img');
            return img.dataset.view === view && img.complete && img.naturalWidth > 0
                && document.querySelectorAll('#legend tbody tr').length > 0;
        }""",
        arg=view,
        timeout=120_000,
    )
    return page.evaluate(
        """() => {
            const img = (id) => { const e = document.getElementById(id); return [e.naturalWidth, e.naturalHeight]; };
            return {
                overlay: img('overlay-img'), photo: img('photo-img'), labels: img('labels-img'),
                overlaySrc: document.getElementById('overlay-img').src.length,
                legend: [...document.querySelectorAll('#legend tbody tr')].map((tr) => tr.innerText),
                status: document.getElementById('status').innerText,
                error: document.getElementById('error').hidden ? '' : document.getElementById('error').innerText,
                toggles: [...document.querySelectorAll('#view-toggle button')].map((b) => b.dataset.view),
            };
        }"""
    )


def test_browser_refine_mode_upload(browser, artifacts):
    refine_engine = Engine(limits=Limits(work_side=256))
    with LiveServer(create_app(refine_engine)) as server:
        page, errors = _open(browser, server.url)
        assert "refine" in page.inner_text("#server-info")
        assert page.locator("#sliders input[type=range]").count() == 7  # the CRF parameters
        page.set_input_files("#photo-input", str(bundled_photo_path()))  # upload the sample photo ...
        page.wait_for_function("() => document.getElementById('status').innerText.includes('label map')")
        page.set_input_files("#labels-input", str(bundled_annotation_path()))  # ... and its coarse annotation
        result = _wait_for_result(page, "refined")
        side = refine_engine.limits.work_side
        assert result["overlay"] == result["photo"] == result["labels"] == [side, side]  # the 500×500 photo, scaled
        assert len(result["legend"]) >= 2 and all("%" in row for row in result["legend"])
        names = {row.split("\t")[1] for row in result["legend"]}
        assert len(names) >= 3 and {"label 0", "label 1"} <= names <= {f"label {k}" for k in range(5)}
        assert " s (server " in result["status"] and result["error"] == ""
        assert result["toggles"] == ["refined", "input"]
        shot = artifacts / "serve-refine.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        with Image.open(shot) as im:
            assert im.size[0] == 1400 and np.asarray(im.convert("L")).std() > 10  # a rendered page, not blank

        # the toggle shows the coarse input; a slider change sends a new request with the new value
        page.click("#view-toggle button[data-view=input]")
        coarse = _wait_for_result(page, "input")
        assert coarse["overlaySrc"] != result["overlaySrc"] or coarse["legend"] != result["legend"]
        with page.expect_response("**/api/refine") as response_info:
            page.evaluate("""() => { const s = document.getElementById('param-num_iterations');
                                      s.value = 2; s.dispatchEvent(new Event('change')); }""")
        assert response_info.value.ok and response_info.value.json()["parameters"]["num_iterations"] == 2
        # the superpixel toggle (refine mode; scikit-image is installed here) sends superpixels=true
        assert page.is_visible("#superpixels-row")
        with page.expect_response("**/api/refine") as response_info:
            page.check("#superpixels")
        answer = response_info.value.json()
        assert response_info.value.ok and answer["parameters"]["superpixels"] == [100, 200, 400], answer.get("error")

        # a broken upload shows the server's message, and the page keeps working
        bad = artifacts / "not-an-image.png"
        bad.write_bytes(b"certainly not a PNG")
        page.set_input_files("#photo-input", str(bad))
        page.set_input_files("#labels-input", str(bundled_annotation_path()))
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        assert "not an image file" in page.inner_text("#error")
        page.click("#sample-button")  # the bundled photo with its annotation, whose classes have names
        page.wait_for_selector("#error", state="hidden", timeout=120_000)
        page.wait_for_function(
            "() => document.querySelector('#legend tbody').innerText.includes('person')", timeout=60_000
        )
        page.click("#view-toggle button[data-view=refined]")  # the page kept the coarse-input view chosen above
        names = {row.split("\t")[1] for row in _wait_for_result(page, "refined")["legend"]}
        assert {"background", "person"} <= names <= set(DEMO_CLASSES)
        assert not errors or all("400" in e for e in errors), errors  # only the refused upload's HTTP 400
        page.close()


def test_browser_segment_mode_toggle(browser, segment_engine, artifacts):
    with LiveServer(create_app(segment_engine)) as server:
        page, _ = _open(browser, server.url)
        assert page.is_visible("#mode-choice") and page.is_hidden("#params")
        page.click("#sample-button")
        crf = _wait_for_result(page, "crf")
        assert crf["toggles"] == ["crf", "fcn"] and len(crf["legend"]) >= 1
        assert any(name in " ".join(crf["legend"]) for name in segment_engine.class_names)
        page.click("#view-toggle button[data-view=fcn]")
        fcn = _wait_for_result(page, "fcn")
        assert fcn["overlaySrc"] != crf["overlaySrc"] or fcn["legend"] != crf["legend"]
        page.screenshot(path=str(artifacts / "serve-segment.png"), full_page=True)
        page.close()
