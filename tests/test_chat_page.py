"""The chat page at `/` in a real headless browser: Debian's chromium driven by selenium through
chromedriver. Load the page, send a message, watch the reply stream in piece by piece, with the
per-token stats and every device's status beside it.

Needs `chromium` and `chromium-driver` (apt; .ci/run installs them); skipped with the reason when
they are missing.
"""
from __future__ import annotations

import shutil
import tempfile
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
pytest.importorskip("openai")
pytest.importorskip("starlette")

from live_server import Server, plan_with_template  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium or chromedriver missing (apt-get install chromium chromium-driver)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,800"]

# records every text the reply bubble shows, so the test sees the stream, not just its end
WATCH = """
window.__seen = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll('.msg.assistant');
  if (bubbles.length) window.__seen.push(bubbles[bubbles.length - 1].firstChild?.textContent ?? '');
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="halo-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_chat_page_streams_a_reply_with_stats_and_device_status(plan_dir, tmp_path, browser):
    from selenium.webdriver.common.by import By

    plan = plan_with_template(plan_dir, tmp_path / "plan")
    # a little emulated delay per link, so the reply visibly arrives token by token
    with Server(plan, "--sync", "strict", "--delay-ms", "2") as server:
        expected = server.client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12,
            temperature=0).choices[0].message.content
        browser.get(f"http://{server.host}:{server.port}/")
        _wait(lambda: browser.find_element(By.ID, "model").text == server.model, 30, "the model name")
        devices = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#devices li[data-device]"), 30, "devices")
        assert [d.get_attribute("data-device") for d in devices] == [d["name"] for d in server.get("/health")[1]
                                                                     ["devices"]]
        assert all("up" in d.get_attribute("class") for d in devices)
        browser.execute_script(WATCH)
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("12")
        browser.find_element(By.ID, "input").send_keys("Hello there")
        browser.find_element(By.ID, "send").click()
        meta = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"), 60, "the reply to end")
        reply = browser.execute_script("return document.querySelector('.msg.assistant').firstChild.textContent")
        assert reply == expected
        seen = [s for s in browser.execute_script("return window.__seen") if s]
        assert len(set(seen)) >= 3, seen  # the text grew in several steps: it was streamed
        assert browser.find_element(By.ID, "s-tokens").text == "12"
        assert browser.find_element(By.ID, "s-p50").text.endswith(" ms")
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.error") == []
        assert "12 tokens" in meta[0].text
        logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not logs, logs
