"""The FastAPI application factory.

Middleware, outermost first: request context (id, access log, HTTP metrics,
last-resort 500), CORS (only when origins are configured), header and body
limits, API-key auth. Then FastAPI's routing with the error handlers of
``service.api.errors``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware

from service.api.auth import PUBLIC_PATHS, AuthMiddleware, KeyChecker
from service.api.errors import install_error_handlers
from service.api.middleware import HTTPMetrics, LimitsMiddleware, RequestContextMiddleware
from service.api.routes import native, ollama, openai, ops, responses, ui
from service.api.runtime import EngineFactory, Runtime, package_version
from service.settings import Settings, get_settings

DESCRIPTION = (
    "Text generation and embeddings from a GPT in plain PyTorch, with continuous batching. "
    'Native routes and an OpenAI-compatible API. Errors are `{"error": {message, type, param, code}}`.'
)


def create_app(
    settings: Settings | None = None, engine_factory: EngineFactory | None = None
) -> FastAPI:
    """A new app; ``engine_factory(settings)`` builds the engine (default: ``Engine.from_pretrained``)."""
    settings = settings or get_settings()
    runtime = Runtime(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.begin()
        try:
            yield
        finally:
            await runtime.shutdown()

    app = FastAPI(
        title="gptserve",
        version=package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own /docs and /redoc load their scripts from a CDN; routes.ui serves them.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.web_ui else None,
    )
    app.state.runtime = runtime
    app.state.http_registry = CollectorRegistry(auto_describe=True)
    install_error_handlers(app)
    for router in (ops.router, native.router, openai.router, responses.router, ollama.router):
        app.include_router(router)
    if settings.web_ui:
        ui.install(app)
    _add_middleware(app, settings)
    # FastAPI's documented hook for a custom schema is assigning app.openapi.
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its 422 entries: validation errors here are 400s."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    # add_middleware wraps: the last one added is the outermost.
    keys = settings.api_keys
    if keys:
        public = PUBLIC_PATHS | ui.PUBLIC_PATHS if settings.web_ui else PUBLIC_PATHS
        app.add_middleware(AuthMiddleware, checker=KeyChecker(keys), public=public)
    app.add_middleware(
        LimitsMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_header_count=settings.max_header_count,
        max_header_bytes=settings.max_header_bytes,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, metrics=HTTPMetrics(app.state.http_registry))
