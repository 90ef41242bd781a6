"""Start-up and the garbage collector: off while the model loads, then the objects
alive are frozen and collection is back on, whether loading worked or not."""

from __future__ import annotations

import gc
import time

from starlette.testclient import TestClient

from service.api.app import create_app
from service.api.runtime import Runtime
from service.settings import Settings
from tests.api.fake_engine import FakeEngine


def test_no_collection_while_loading_then_frozen_and_back_on():
    seen: list[bool] = []
    engine = FakeEngine()

    def factory(_settings: Settings) -> FakeEngine:
        seen.append(gc.isenabled())
        return engine

    gc.unfreeze()
    app = create_app(Settings(), engine_factory=factory)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/ready").status_code == 200
        assert seen == [False]
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        assert client.post("/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_collection_is_back_on_when_loading_fails():
    def factory(_settings: Settings) -> FakeEngine:
        raise RuntimeError("no model here")

    gc.unfreeze()
    app = create_app(Settings(), engine_factory=factory)
    with TestClient(app) as client:
        runtime: Runtime = app.state.runtime
        deadline = time.monotonic() + 10
        while runtime.phase != "failed" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime.phase == "failed"
        assert client.get("/ready").status_code == 503
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
