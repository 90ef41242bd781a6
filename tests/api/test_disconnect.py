"""A client that goes away aborts its engine request, streamed or not."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.api.app import create_app
from service.settings import Settings
from tests.api.api_testlib import asgi_call
from tests.api.fake_engine import FakeEngine

HEADERS = [(b"host", b"testserver"), (b"content-type", b"application/json")]


async def _served(app):
    runtime = app.state.runtime
    for _ in range(500):
        if runtime.phase == "ready":
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("not ready")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"prompt": "abc", "max_tokens": 400}),
        ("/generate", {"prompt": "abc", "max_tokens": 400, "stream": True}),
        (
            "/v1/completions",
            {"model": "smollm2-135m-instruct", "prompt": "abc", "max_tokens": 400, "n": 3},
        ),
        (
            "/v1/chat/completions",
            {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "a"}],
                "max_tokens": 400,
                "n": 2,
                "stream": True,
            },
        ),
    ],
)
def test_disconnect_aborts_the_engine_requests(path, body):
    engine = FakeEngine(token_delay=0.01)
    app = create_app(Settings(), engine_factory=lambda _s: engine)

    async def scenario():
        async with app.router.lifespan_context(app):
            await _served(app)
            started = time.monotonic()
            await asgi_call(
                app,
                "POST",
                path,
                headers=HEADERS,
                body=json.dumps(body).encode(),
                disconnect_after=0.1,
            )
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.05)
            return elapsed

    elapsed = asyncio.run(scenario())
    assert elapsed < 2.0  # 1000 tokens at 10 ms each would take 10 s
    choices = body.get("n", 1)
    assert len(engine.aborted) == choices
    assert engine.running == set()


def test_finished_requests_are_not_aborted():
    engine = FakeEngine()
    app = create_app(Settings(), engine_factory=lambda _s: engine)

    async def scenario():
        async with app.router.lifespan_context(app):
            await _served(app)
            body = json.dumps({"prompt": "abc", "max_tokens": 3, "stream": True}).encode()
            return await asgi_call(app, "POST", "/generate", headers=HEADERS, body=body)

    result = asyncio.run(scenario())
    assert result.status == 200 and result.body.endswith(b"data: [DONE]\n\n")
    assert engine.aborted == []
