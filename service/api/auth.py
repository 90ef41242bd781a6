"""Bearer-key authentication as pure ASGI middleware.

Deny by default: every path needs a key except the exact probe paths in
``PUBLIC_PATHS`` and, when they are on, the exact paths of the pages of
``routes.ui``, which hold no data (the app passes both as ``public``). The
decision uses the ASGI scope's ``path`` (what routing uses), never a URL
rebuilt from the Host header. Keys are compared as SHA-256
digests with ``hmac.compare_digest`` against every configured key, without an
early exit, so timing reveals neither a prefix nor which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import APIError

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})


class KeyChecker:
    """Holds digests of the accepted keys, never the keys themselves."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key.encode("utf-8")) for key in keys]
        if not self._digests:
            raise ValueError("KeyChecker needs at least one key")

    def accepts(self, token: bytes) -> bool:
        candidate = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first ``Authorization: Bearer <token>`` header, if any."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            token = token.strip()
            return token or None
    return None


class AuthMiddleware:
    def __init__(
        self, app: ASGIApp, checker: KeyChecker, public: frozenset[str] = PUBLIC_PATHS
    ) -> None:
        self.app = app
        self.checker = checker
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self.public:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        if token is not None and self.checker.accepts(token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        message = "missing API key" if token is None else "invalid API key"
        error = APIError(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await error.response()(scope, receive, send)
