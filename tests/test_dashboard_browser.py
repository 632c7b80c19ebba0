"""The live dashboard in a real browser: Playwright driving Debian's chromium.

``.ci/run`` installs chromium when it is missing; under CI=true a missing browser fails this
test instead of skipping it. The screenshot goes to ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "test-dashboard-token-0123456789"
HOSTILE_USER = "<script>alert(1)</script>"
HTML_ROUTE = "/x/<script>window.__xss=1</script>"


def require_browser() -> None:
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        (pytest.fail if ci else pytest.skip)("playwright is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        (pytest.fail if ci else pytest.skip)(f"{CHROMIUM} missing: apt-get install chromium")


@pytest.fixture
def server() -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "dashboard_app:app", "--port", str(port)]
    argv += ["--log-level", "warning", "--app-dir", str(APPS)]
    env = {**os.environ, "DASHBOARD_TOKEN": TOKEN}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "uvicorn exited"
            assert time.monotonic() < deadline, "the app did not start"
            try:
                httpx.get(base + "/items/warmup", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)
        if process.stderr is not None:
            process.stderr.close()


def test_dashboard_live_in_chromium(server: str) -> None:
    require_browser()
    from playwright.sync_api import sync_playwright

    # Without the token: nothing, not even the script or the feed.
    for path in ("/dash/", "/dash/app.js", "/dash/events", "/dash/summary", "/dash/?token=nope"):
        assert httpx.get(server + path, timeout=10).status_code == 401, path

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    args += ["--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            # Without the page's CSP, which would also refuse an injected inline script:
            # what is tested here is that no value is ever parsed as HTML. (The CSP would
            # also refuse Playwright's own evaluation of the conditions below.)
            page = browser.new_context(bypass_csp=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            response = page.goto(f"{server}/dash/?token={TOKEN}")
            assert response is not None
            assert "script-src 'self'" in response.headers["content-security-policy"]
            assert page.url == f"{server}/dash/"  # the token left the address bar
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('live')"
            )
            before = int(page.text_content("#total") or "0")

            with httpx.Client(base_url=server, timeout=10) as client:
                statuses = [
                    client.get(f"/items/{i}", headers={"x-user": HOSTILE_USER}).status_code
                    for i in range(12)
                ]
                assert statuses == [200] * 5 + [429] * 7
                assert client.get(HTML_ROUTE).status_code == 200

            page.wait_for_function(
                f"Number(document.getElementById('total').textContent) >= {before + 13}",
                timeout=30_000,
            )
            assert page.text_content("#blocked") == "7"
            cells = page.locator("td").all_text_contents()
            assert "user:<scr…" in cells  # the hostile user, masked, as text
            assert f"GET {HTML_ROUTE}" in cells  # a template that is HTML, as text
            assert page.evaluate("window.__xss") is None
            assert page.locator("script").count() == 1  # only app.js
            assert page.locator("tbody s, tbody script").count() == 0
            assert page.text_content("#block-rate") != "0%"
            assert page.locator("#line-total").get_attribute("points")
            assert errors == []
            artefacts = ROOT / "test-artifacts"
            artefacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artefacts / "dashboard.png"), full_page=True)
        finally:
            browser.close()
