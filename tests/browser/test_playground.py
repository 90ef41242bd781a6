"""The playground and the API docs in a real Chromium, against the real server.

Each test ends by checking that no request left the host and that the console
stayed free of errors. The shared server (``live_server``) serves the default model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.browser.browser_testlib import Watch, gauge, wait_for_gauge
from tests.integration.live_server import MODEL, LiveServer

pytestmark = pytest.mark.slow

RUNNING = "gptserve_requests_running"

# Counts the visible states of the latest reply: several distinct lengths mean the text
# arrived in pieces, not in one block at the end.
OBSERVE_REPLY = """(selector) => {
  window.__lengths = [];
  const log = document.querySelector(selector);
  new MutationObserver(() => {
    const texts = log.querySelectorAll('.message:last-child .text');
    if (texts.length) window.__lengths.push(texts[texts.length - 1].textContent.length);
  }).observe(log, {subtree: true, childList: true, characterData: true});
}"""


def open_playground(watch: Watch, server: LiveServer) -> Any:
    page = watch.page
    page.goto(server.base_url + "/")
    page.wait_for_function(
        "() => document.getElementById('info-model').textContent !== '…'", timeout=30_000
    )
    return page


def finished(page: Any, log: str) -> Any:
    """The latest reply, once the page is done with it (``data-done`` is ok or error)."""
    page.wait_for_function(
        "(log) => document.querySelector(`#${log} .message:last-child`)?.dataset.done",
        arg=log,
        timeout=120_000,
    )
    return page.locator(f"#{log} .message").last


def stats(page: Any, log: str) -> dict[str, str]:
    reply = finished(page, log)
    assert reply.get_attribute("data-done") == "ok", reply.inner_text()
    return {
        key: reply.locator(f"[data-stat={key}] b").inner_text()
        for key in ("ttft", "tps", "in", "out", "finish")
    }


def set_field(page: Any, field: str, value: str) -> None:
    page.fill(f"#{field}", value)


def test_chat_streams_a_reply_with_its_figures(
    watch: Watch, live_server: LiveServer, screenshots: Path
):
    page = open_playground(watch, live_server)
    assert page.inner_text("#info-model") == MODEL
    assert re.fullmatch(r"[\d,]+ tokens", page.inner_text("#info-context"))
    assert page.inner_text("#info-dtype") in {"float32", "bfloat16", "float16"}
    assert page.inner_text("#info-device") == "cpu"
    # The defaults are shown in the settings.
    assert page.input_value("#temperature") == "1"
    assert page.input_value("#top_p") == "1"
    assert page.input_value("#top_k") == "0"
    page.wait_for_function("() => document.getElementById('live-running').textContent === '0'")
    assert re.fullmatch(r"\d+\.\d %", page.inner_text("#live-kv"))

    set_field(page, "temperature", "0")
    set_field(page, "max_tokens", "12")
    page.click("#prompt")
    # Shift+Enter adds a line, Enter sends.
    page.keyboard.type("Name three colours.")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("One line each.")
    assert page.input_value("#prompt") == "Name three colours.\nOne line each."
    assert page.locator("#chat-log .message").count() == 0
    page.evaluate(OBSERVE_REPLY, "#chat-log")
    page.keyboard.press("Enter")

    assert page.inner_text("#chat-log .message.user .text") == "Name three colours.\nOne line each."
    figures = stats(page, "chat-log")
    reply = page.inner_text("#chat-log .message.assistant .text")
    assert reply.strip(), "no reply text"
    lengths = page.evaluate("window.__lengths")
    assert len({n for n in lengths if n > 0}) >= 3, f"the reply did not stream: {lengths}"
    assert re.fullmatch(r"\d+ ms", figures["ttft"]), figures
    assert int(figures["in"]) > 5, figures
    assert 1 <= int(figures["out"]) <= 12, figures
    assert figures["finish"] in {"stop", "length"}, figures
    if int(figures["out"]) > 2:
        assert float(figures["tps"]) > 0, figures
    assert page.input_value("#prompt") == ""
    assert page.is_enabled("#send") and page.is_disabled("#stop")

    # A second turn sends the whole conversation.
    set_field(page, "max_tokens", "4")
    with page.expect_request("**/v1/chat/completions") as request_info:
        page.fill("#prompt", "Thanks.")
        page.click("text=Send")
    body = request_info.value.post_data_json
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == reply
    assert body["stream"] is True and body["model"] == MODEL
    stats(page, "chat-log")
    page.wait_for_function("() => document.getElementById('live-running').textContent === '0'")
    page.screenshot(path=str(screenshots / "playground.png"))
    assert (screenshots / "playground.png").stat().st_size > 10_000
    watch.assert_clean()


def test_stop_mid_stream_frees_the_server(watch: Watch, live_server: LiveServer):
    page = open_playground(watch, live_server)
    set_field(page, "max_tokens", "2000")
    page.check("#ignore_eos")
    page.fill("#prompt", "Tell me a long story about a lighthouse.")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => (document.querySelector('#chat-log .message.assistant .text')?.textContent.length ?? 0) > 3",
        timeout=60_000,
    )
    assert gauge(live_server.base_url, RUNNING) == 1
    assert page.is_enabled("#stop")
    page.click("#stop")
    figures = stats(page, "chat-log")
    assert figures["finish"] == "stopped"
    assert figures["out"].startswith("≈"), figures  # no usage event: counted on the page
    # The aborted fetch closed the connection; the server dropped the request and its blocks.
    assert wait_for_gauge(live_server.base_url, RUNNING, 0) == 0
    page.wait_for_function(
        "() => document.getElementById('live-running').textContent === '0'", timeout=10_000
    )
    assert page.is_enabled("#send")
    watch.assert_clean()


def test_raw_mode_completes_against_generate(watch: Watch, live_server: LiveServer):
    page = open_playground(watch, live_server)
    page.click("text=Raw completion")
    assert page.is_visible("#raw-log") and not page.is_visible("#chat-log")
    assert page.is_disabled("#json_schema")
    set_field(page, "temperature", "0")
    set_field(page, "max_tokens", "8")
    set_field(page, "seed", "7")
    page.fill("#prompt", "The capital of France is")
    with page.expect_request("**/generate") as request_info:
        page.keyboard.press("Enter")
    body = request_info.value.post_data_json
    assert body == {
        "prompt": "The capital of France is",
        "stream": True,
        "temperature": 0,
        "top_p": 1,
        "top_k": 0,
        "max_tokens": 8,
        "seed": 7,
    }
    figures = stats(page, "raw-log")
    assert page.inner_text("#raw-log .message.completion .text").strip()
    assert figures["out"] == "8" and figures["finish"] == "length", figures
    assert int(figures["in"]) > 0
    watch.assert_clean()


def test_server_errors_are_shown_with_their_message(watch: Watch, live_server: LiveServer):
    page = open_playground(watch, live_server)
    set_field(page, "max_tokens", "999999")
    page.fill("#prompt", "Hello")
    page.keyboard.press("Enter")
    error = page.locator("#chat-log .message.assistant .error")
    error.wait_for()
    assert re.search(r"HTTP 400: .*max_tokens", error.inner_text()), error.inner_text()
    assert finished(page, "chat-log").get_attribute("data-done") == "error"
    assert page.locator("#chat-log .message.user.failed").count() == 1
    assert page.locator("#chat-log .message.assistant .stats").count() == 0
    assert page.is_enabled("#send")

    # The JSON-schema box: not JSON is caught on the page; a schema is sent as response_format.
    set_field(page, "max_tokens", "16")
    page.fill("#json_schema", "{not json")
    page.fill("#prompt", "Hello")
    page.keyboard.press("Enter")
    assert "not valid JSON" in page.locator("#chat-log .message.assistant .error").last.inner_text()
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    page.fill("#json_schema", '{"type": "object", "properties": {"answer": {"type": "string"}}}')
    with page.expect_request("**/v1/chat/completions") as request_info:
        page.fill("#prompt", "Answer in JSON.")
        page.keyboard.press("Enter")
    sent = request_info.value.post_data_json["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "playground", "schema": schema}}
    reply = finished(page, "chat-log")
    # Refused (until the server knows structured output) or answered: either way the page
    # shows what the server said.
    if reply.locator(".error").count():
        assert re.search(r"HTTP 400: .*response_format", reply.locator(".error").inner_text())
    else:
        assert reply.locator(".text").inner_text().strip()
    watch.assert_clean(ignore=(r"status of 400",))


def test_swagger_ui_and_redoc_render_offline(
    watch: Watch, live_server: LiveServer, screenshots: Path
):
    page = watch.page
    page.goto(live_server.base_url + "/docs")
    page.locator(".opblock").first.wait_for()
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/generate", "/v1/chat/completions", "/info", "/metrics"} <= {
        p.replace("\u200b", "") for p in paths
    }, paths
    page.screenshot(path=str(screenshots / "docs.png"))
    page.goto(live_server.base_url + "/redoc")
    page.get_by_text("/v1/chat/completions").first.wait_for()
    assert page.locator("[data-section-id]").count() > 10
    page.screenshot(path=str(screenshots / "redoc.png"))
    watch.assert_clean()
