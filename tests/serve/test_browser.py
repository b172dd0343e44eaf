"""The web page of `wan-nabla serve` in a real headless Chromium (the distribution's package, driven
by Playwright): open it behind the API key, submit a prompt, watch it complete, play the video,
cancel a running job. Skips only when no browser is installed and CI is not set; under CI=true
a missing browser fails (.ci/run installs chromium with apt-get)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.support.serve_util import ServeProcess

KEY = "browser-key-0123456789"
BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def _browser() -> str | None:
    found = next((p for p in BROWSERS if Path(p).is_file()), None) or shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found = None
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI is set but no Chromium + Playwright: .ci/run must install them (apt-get install chromium)")
        pytest.skip("no Chromium (apt-get install chromium) or no playwright python package; CI would fail here")
    return found


@pytest.mark.slow
def test_page_submits_shows_progress_plays_and_cancels(tmp_path):
    exe = _browser()
    from playwright.sync_api import expect, sync_playwright

    with ServeProcess(tmp_path / "data", api_key=KEY) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            ctx = browser.new_context(http_credentials={"username": "me", "password": KEY})
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            expect(page.locator("#health")).to_have_text("Model loaded.", timeout=30_000)
            expect(page.locator("#preset option[value=sta_11_3_3]")).to_have_count(1)
            page.fill("#apikey", KEY)
            page.fill("#prompt", "a red fox running through snow")
            page.fill("#size", "32x32")
            page.fill("#seconds", "0.3")
            page.fill("#steps", "2")
            page.click("#submit")
            row = page.locator("#jobs tr").first
            expect(row).to_have_attribute("data-status", "completed", timeout=60_000)
            video = row.locator("video")
            expect(video).to_have_count(1, timeout=20_000)
            page.wait_for_function("document.querySelector('#jobs video').readyState >= 1", timeout=20_000)
            assert page.evaluate("document.querySelector('#jobs video').videoWidth") == 32
            page.screenshot(path=str(tmp_path / "page.png"))
            # bad input: the server's message is shown, nothing queued
            page.fill("#prompt", "too big")
            page.fill("#size", "33x32")
            page.click("#submit")
            expect(page.locator("#error")).to_contain_text("size", timeout=10_000)
            expect(page.locator("#jobs tr")).to_have_count(1)
            # cancel a running job
            page.fill("#size", "64x64")
            page.fill("#seconds", "0.5")
            page.fill("#steps", "250")  # the most UniPC runs at shift 5
            page.fill("#prompt", "a long one to cancel")
            page.click("#submit")
            running = page.locator("#jobs tr[data-status=in_progress]")
            expect(running).to_have_count(1, timeout=30_000)
            running.locator("button.cancel").click()
            expect(page.locator("#jobs tr")).to_have_count(1, timeout=30_000)
            assert not errors, errors
        finally:
            browser.close()
