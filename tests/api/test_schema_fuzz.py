"""Schemathesis against the app's own OpenAPI schema, on the fake engine.

Every operation gets generated requests (valid and invalid); none may produce a
5xx, and every response must match what the schema declares (status code,
content type, body).
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from service.api.serving import Limits
from service.settings import Settings
from tests.api.fake_engine import FakeEngine


def _ready_app():
    """The app with its fake engine installed as the lifespan would (schemathesis runs no lifespan)."""
    engine = FakeEngine()
    engine.start()
    app_settings = Settings()
    app = create_app(app_settings, engine_factory=lambda _s: engine)
    runtime = app.state.runtime
    runtime.engine = engine
    runtime.limits = Limits.build(app_settings, engine.max_model_len, engine.tokenizer.vocab_size)
    runtime.phase = "ready"
    return _without_lifespan(app)


def _without_lifespan(app):
    """Schemathesis runs the lifespan around every call; the engine must outlive them all."""

    async def asgi(scope, receive, send):
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    return asgi


schema = schemathesis.openapi.from_asgi("/openapi.json", _ready_app())
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(checks=CHECKS)
