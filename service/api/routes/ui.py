"""Pages for people: the playground at ``/`` and the API docs at ``/docs`` and ``/redoc``.

Every file comes from a package on this host, so the pages work behind a firewall:
the playground's own files from ``service/api/static``, Swagger UI and ReDoc from
the ``fastapi-offline`` package, which ships their bundles (MIT; Swagger UI and
ReDoc are Apache-2.0 and MIT). Each file has its own exact route, so that the
set of public paths (``PUBLIC_PATHS``) is a fixed list, like the probes'. The
pages hold no data: what they show comes from the API, with the key the person
types in, when the server has one. A ``Content-Security-Policy`` limits every
page to this origin, so a page cannot reach another host even by mistake.
``Settings.web_ui`` (off) leaves all of this, and ``/openapi.json``, out.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, Response

STATIC = Path(__file__).resolve().parents[1] / "static"

# Swagger UI and ReDoc draw with inline styles and ReDoc searches in a blob: worker;
# scripts, connections, fonts and images stay on this origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
    "connect-src 'self'; frame-ancestors 'self'; base-uri 'self'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change only with the package: revalidate, then use the cached copy.
    "Cache-Control": "no-cache",
}

# path -> (directory key, file name, media type)
_OWN = "own"
_VENDOR = "vendor"
_HTML = "text/html; charset=utf-8"
_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
FILES: dict[str, tuple[str, str, str]] = {
    "/": (_OWN, "index.html", _HTML),
    "/docs": (_OWN, "docs.html", _HTML),
    "/redoc": (_OWN, "redoc.html", _HTML),
    "/ui/playground.js": (_OWN, "playground.js", _JS),
    "/ui/playground.css": (_OWN, "playground.css", _CSS),
    "/ui/key.js": (_OWN, "key.js", _JS),
    "/ui/docs.js": (_OWN, "docs.js", _JS),
    "/ui/favicon.svg": (_OWN, "favicon.svg", "image/svg+xml"),
    "/ui/swagger-ui-bundle.js": (_VENDOR, "swagger-ui-bundle.js", _JS),
    "/ui/swagger-ui.css": (_VENDOR, "swagger-ui.css", _CSS),
    "/ui/redoc.standalone.js": (_VENDOR, "redoc.standalone.js", _JS),
}
PUBLIC_PATHS = frozenset(FILES)

# ReDoc's sidebar shows Redocly's logo from their CDN, as an <img> that it drops when the
# image fails to load. The bundle is served with that address replaced by an empty data:
# URL, so that the browser never asks another host (the page's CSP would refuse it anyway).
PATCHES: dict[str, tuple[tuple[bytes, bytes], ...]] = {
    "/ui/redoc.standalone.js": ((b"https://cdn.redoc.ly/redoc/logo-mini.svg", b"data:,"),),
}


@functools.lru_cache(maxsize=1)
def vendor_dir() -> Path:
    """The folder of Swagger UI's and ReDoc's bundles in the installed ``fastapi_offline``."""
    return Path(str(files("fastapi_offline") / "static"))


def file_path(url_path: str) -> Path:
    where, name, _ = FILES[url_path]
    return (STATIC if where == _OWN else vendor_dir()) / name


@functools.lru_cache(maxsize=len(PATCHES))
def patched(url_path: str) -> bytes:
    """A file with its ``PATCHES`` applied; each must match, or the bundle has changed."""
    content = file_path(url_path).read_bytes()
    for old, new in PATCHES[url_path]:
        if old not in content:
            raise RuntimeError(f"{file_path(url_path)} no longer contains {old!r}")
        content = content.replace(old, new)
    return content


def _endpoint(url_path: str) -> Callable[[], Awaitable[Response]]:
    media_type = FILES[url_path][2]

    async def serve_file() -> Response:
        if url_path in PATCHES:
            return Response(patched(url_path), media_type=media_type, headers=PAGE_HEADERS)
        return FileResponse(file_path(url_path), media_type=media_type, headers=PAGE_HEADERS)

    serve_file.__name__ = "ui_" + (
        url_path.strip("/").replace("/", "_").replace(".", "_") or "root"
    )
    return serve_file


def install(app: FastAPI) -> None:
    """Adds one GET route per file, on the app itself (not in the OpenAPI schema)."""
    for path in FILES:
        app.add_api_route(path, _endpoint(path), methods=["GET"], include_in_schema=False)
