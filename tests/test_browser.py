"""The page in a real browser: Playwright drives Debian's Chromium against the app on 127.0.0.1.

CI installs Chromium (`apt-get install -y chromium`) and runs this test; elsewhere it is skipped when
/usr/bin/chromium is missing. Set CIFARLAB_SCREENSHOT=PATH to keep the screenshot, CIFARLAB_SCREENSHOT_DIR=DIR to
keep one of each data tab, and CIFARLAB_APP_CKPT / CIFARLAB_APP_DATA / CIFARLAB_APP_COMPARE to shoot the page of
real checkpoints instead of the tiny synthetic ones.
"""

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own background traffic (updates, sync, safe browsing) would leave the machine: switch it off.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-default-apps"]


@pytest.fixture(scope="module")
def page_url(smoke_run):
    from cifarlab.app import CifarApp, launch

    root, run, ckpt = smoke_run
    ckpt = os.environ.get("CIFARLAB_APP_CKPT", ckpt)
    root = os.environ.get("CIFARLAB_APP_DATA", root)
    other = os.environ.get("CIFARLAB_APP_COMPARE", run / "checkpoints" / "last.ckpt")
    demo = launch(CifarApp(ckpt, str(root), compare=other), "127.0.0.1", None, block=False)
    yield demo.local_url, Path(root)
    demo.close()


def need_chromium():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium not found at {CHROMIUM}: CI must install it (apt-get install -y chromium)")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")


def test_upload_classify_and_screenshot(page_url, tmp_path):
    need_chromium()
    from playwright.sync_api import sync_playwright

    url, root = page_url
    image = sorted((root / "test").glob("*/*"))[0]
    requested = []
    shot = Path(os.environ.get("CIFARLAB_SCREENSHOT", tmp_path / "app.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requested.append(request.url))
        page.goto(url)
        # The examples fill themselves once the test set is loaded in the background; a click classifies one.
        page.wait_for_function("() => document.querySelectorAll('#examples img').length >= 2", timeout=120_000)
        page.locator("#examples img").first.click()
        page.wait_for_function(
            "() => { const el = document.querySelector('#label'); return el && /\\d+%/.test(el.innerText); }",
            timeout=60_000)
        example_label = page.inner_text("#label")
        page.wait_for_selector("#upload input[type=file]", state="attached")
        page.set_input_files("#upload input[type=file]", str(image))
        page.click("#classify")
        page.wait_for_function(
            "() => { const el = document.querySelector('#label'); return el && /\\d+%/.test(el.innerText); }",
            timeout=60_000)
        label_text = page.inner_text("#label")
        page.wait_for_timeout(500)  # let the CAM images paint
        page.screenshot(path=str(shot), full_page=True)
        errors = page.locator(".toast-body.error").all_inner_texts()  # Gradio's error toasts
        browser.close()
    assert not errors, errors
    classes = [p.name for p in (root / "test").iterdir() if p.is_dir()]
    assert any(name in label_text for name in classes), label_text  # the page names a class of the checkpoint
    assert any(name in example_label for name in classes), example_label
    assert shot.stat().st_size > 20_000
    hosts = {urlparse(u).hostname for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page requested other hosts: {hosts - {'127.0.0.1'}}"


def test_data_tabs_fill_themselves_and_answer_clicks_in_a_browser(page_url, tmp_path):
    """Likely mislabeled, Near-duplicates, Embedding map (a click on the map) and Compare, as a person uses them:
    each tab fills itself once its data is ready, with no "Show" click; a click on the map shows the images there."""
    need_chromium()
    from playwright.sync_api import sync_playwright

    url, _ = page_url
    shots = Path(os.environ.get("CIFARLAB_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    requested = []

    def summary_says(page, elem_id, pattern):
        page.wait_for_function(f"() => /{pattern}/.test(document.querySelector('#{elem_id}')?.innerText || '')",
                               timeout=120_000)
        page.wait_for_timeout(700)  # let the gallery's images paint

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on("request", lambda request: requested.append(request.url))
        page.goto(url)

        def show(tab, prefix, pattern, shot):
            page.get_by_role("tab", name=tab).click()
            summary_says(page, f"{prefix}-summary", pattern)  # filled by the page itself
            page.screenshot(path=str(shots / shot), full_page=True)

        show("Likely mislabeled", "label-issues", "cleanlab flags", "app_mislabeled.png")
        show("Near-duplicates", "duplicates", "de-duplicated test set", "app_duplicates.png")
        page.get_by_role("tab", name="Embedding map").click()
        image = page.locator("#embedding-map img")
        image.wait_for(timeout=60_000)
        box = image.bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
        summary_says(page, "embedding-summary", "nearest to")
        page.screenshot(path=str(shots / "app_embedding.png"), full_page=True)
        show("Compare", "compare", "only A is right", "app_compare.png")
        texts = {i: page.inner_text(f"#{i}") for i in ("label-issues-summary", "duplicates-summary",
                                                        "embedding-summary", "compare-summary")}
        errors = page.locator(".toast-body.error").all_inner_texts()  # Gradio's error toasts
        browser.close()
    assert not errors, errors
    assert "test images" in texts["label-issues-summary"]
    assert "mistakes" in texts["embedding-summary"]
    hosts = {urlparse(u).hostname for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page requested other hosts: {hosts - {'127.0.0.1'}}"
