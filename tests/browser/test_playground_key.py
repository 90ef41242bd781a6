"""The playground and docs on a server with an API key: the page asks for it, sends it, and
keeps it in this tab's sessionStorage only."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.browser_testlib import Watch
from tests.integration.live_server import KEYS, MODEL, LiveServer

pytestmark = pytest.mark.slow

KEY = KEYS[1]
# Chrome logs each 401 (the page's first, keyless try) as a failed resource load.
EXPECTED = (r"status of 401",)


@pytest.fixture
def keyed(keyed_server: LiveServer) -> LiveServer:
    return keyed_server


def enter_key(page: Any, key: str) -> None:
    dialog = page.locator("#key-dialog")
    dialog.wait_for()
    dialog.locator("input").fill(key)
    dialog.locator("button").click()


def test_the_page_asks_for_the_key_and_keeps_it_in_the_tab(
    browser: Any, watch: Watch, keyed: LiveServer
):
    page = watch.page
    page.goto(keyed.base_url + "/")
    assert "needs an API key" in page.inner_text("#key-dialog")
    enter_key(page, "wrong-key")
    assert "refused that key" in page.inner_text("#key-dialog")
    enter_key(page, KEY)
    page.wait_for_function("() => document.getElementById('info-model').textContent !== '…'")
    assert page.inner_text("#info-model") == MODEL

    page.click("text=Raw completion")
    page.fill("#max_tokens", "4")
    page.fill("#prompt", "Hello")
    with page.expect_request("**/generate") as request_info:
        page.keyboard.press("Enter")
    assert request_info.value.headers["authorization"] == f"Bearer {KEY}"
    page.locator("#raw-log .message[data-done=ok] .stats").wait_for(timeout=60_000)
    assert page.inner_text("#raw-log [data-stat=finish] b") == "length"

    assert page.evaluate("sessionStorage.getItem('gptserve.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0
    assert page.context.cookies() == []
    watch.assert_clean(ignore=EXPECTED)

    # Another browser context (a new session) does not know the key.
    other = browser.new_context()
    try:
        fresh = other.new_page()
        fresh.goto(keyed.base_url + "/")
        fresh.locator("#key-dialog").wait_for()
        assert fresh.evaluate("sessionStorage.getItem('gptserve.apiKey')") is None
    finally:
        other.close()


def test_docs_ask_for_the_key_too(watch: Watch, keyed: LiveServer):
    page = watch.page
    page.goto(keyed.base_url + "/docs")
    enter_key(page, KEY)
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() > 10
    watch.assert_clean(ignore=EXPECTED)
