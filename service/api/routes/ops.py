"""Operational routes: liveness, readiness, metrics, server info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from service.api.errors import ERROR_RESPONSES, APIError
from service.api.runtime import ServedDep, get_runtime, package_version
from service.api.schemas.native import InfoOut

router = APIRouter(tags=["operations"])

_STATUS = {"content": {"application/json": {"example": {"status": "ok"}}}}


@router.get("/health", responses={200: _STATUS, 503: ERROR_RESPONSES[503]})
async def health(request: Request) -> Response:
    """Alive: the process and the engine loop run (200 while the model loads too)."""
    if not get_runtime(request).healthy():
        raise APIError(503, "the engine has stopped", code="engine_dead")
    return JSONResponse({"status": "ok"})


@router.get("/ready", responses={200: _STATUS, 503: ERROR_RESPONSES[503]})
async def ready(request: Request) -> Response:
    """Ready: the model is loaded and warm and the server is not draining."""
    get_runtime(request).served()
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: the engine's series and the HTTP series."""
    runtime = get_runtime(request)
    registries = [request.app.state.http_registry]
    engine_registry = getattr(runtime.engine, "registry", None)
    if engine_registry is not None:
        registries.insert(0, engine_registry)
    body = b"".join(generate_latest(registry) for registry in registries)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/info", response_model=InfoOut, responses=ERROR_RESPONSES)
async def info(ctx: ServedDep) -> InfoOut:
    """The served model, its configuration, and the limits in force."""
    engine = ctx.engine
    config = engine.model_config.to_dict() if hasattr(engine.model_config, "to_dict") else {}
    limits = {k: v for k, v in vars(ctx.limits).items() if isinstance(v, int)}
    return InfoOut(
        model=ctx.settings.model_name,
        version=package_version(),
        max_model_len=engine.max_model_len,
        dtype=str(engine.dtype).removeprefix("torch."),
        device=str(engine.device),
        weights=getattr(engine, "weights", ""),
        kv_cache_dtype=getattr(engine, "kv_cache_dtype", ""),
        config=_jsonable(config),
        limits=limits,
    )


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
        for k, v in config.items()
    }
