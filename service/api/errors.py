"""Every error the API returns, in one shape and one place.

The body is always ``{"error": {"message", "type", "param", "code"}}`` (the
OpenAI shape, which the official clients parse). Engine errors map to HTTP
here; anything unexpected is logged with its traceback and answered with a
generic 500 so that internals never reach the client.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from service.api.validation import settings_of, validation_message
from service.engine.types import (
    EngineDead,
    EngineError,
    EngineUnavailable,
    QueueFull,
    RequestError,
    RequestFailed,
    TemplateError,
    TemplateRaised,
)

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "client_closed_request",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with its HTTP status; raise it anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(
    message: str, error_type: str, param: str | None, code: str | None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx response."""

    error: ErrorDetail


def from_engine_error(exc: EngineError) -> APIError:
    """The HTTP form of an engine error."""
    if isinstance(exc, QueueFull):
        retry = max(1, math.ceil(exc.retry_after))
        return APIError(429, exc.message, code=exc.code, headers={"Retry-After": str(retry)})
    if isinstance(exc, RequestFailed):
        logger.error("the engine failed a request: %s", exc.message)
        return internal_error()
    if isinstance(exc, RequestError):
        return APIError(400, exc.message, code=exc.code, param=exc.param)
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc) or "the engine is not accepting requests", code="unavailable")
    if isinstance(exc, EngineDead):
        logger.error("engine is dead: %s", exc)
        return APIError(
            503, "the engine has stopped; the server needs a restart", code="engine_dead"
        )
    logger.error("unexpected engine error", exc_info=exc)
    return internal_error()


def template_error(exc: TemplateError, param: str) -> APIError:
    """A chat template that refused the conversation on purpose (``raise_exception``)
    is the request's fault: 400. One that broke or exceeded a limit is the model's:
    a 500 that says so and names the template, not the generic one."""
    if isinstance(exc, TemplateRaised):
        return bad_request(str(exc), param, code="chat_template_rejected")
    logger.error("chat template failure: %s", exc)
    return APIError(500, str(exc), code="chat_template_error")


def internal_error() -> APIError:
    return APIError(500, "internal server error", code="internal_error")


def as_api_error(exc: BaseException) -> APIError:
    """Any exception as an APIError; unexpected ones are logged with their traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineError):
        return from_engine_error(exc)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return internal_error()


async def _on_error(request: Request, exc: Exception) -> Response:
    return as_api_error(exc).response()


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    message, param = validation_message(errors, settings_of(request.app.state))
    return bad_request(message, param=param, code="invalid_value").response()


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    detail = exc.detail if isinstance(exc, StarletteHTTPException) else ""
    message = detail if isinstance(detail, str) and detail else "request failed"
    headers = getattr(exc, "headers", None)
    if status == 404:
        message = f"no route for {request.method} {request.url.path}"
    return APIError(status, message, code=_http_code(status), headers=headers).response()


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        status, "invalid_request"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_error)
    app.add_exception_handler(EngineError, _on_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_error)


# Declared on every route so that the OpenAPI schema lists the error responses.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "queue full; retry after Retry-After seconds"),
        (431, "request headers too large"),
        (500, "internal error"),
        (503, "not ready, draining, or the engine stopped"),
    )
}
