"""API-key auth: deny by default, probes public, forged Host headers don't bypass it.

These tests also run under ``python -O`` (see the last test): no check may rely on ``assert``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.api.app import create_app
from service.api.auth import PUBLIC_PATHS, KeyChecker, bearer_token
from service.api.routes import ui
from service.settings import Settings
from tests.api.api_testlib import asgi_call, assert_error, serve
from tests.api.fake_engine import FakeEngine

KEYS = "first-key-123,second-key-456"
GOOD = ["first-key-123", "second-key-456"]


@pytest.fixture
def secured():
    with serve(FakeEngine(), api_key=KEYS) as client:
        client.headers.pop("Authorization")
        yield client


def _routes(app):
    """(method, concrete path) of every route the app serves: the OpenAPI operations
    (FastAPI nests included routers) plus the documentation routes."""
    seen = set()
    for path, operations in app.openapi()["paths"].items():
        for method in operations:
            seen.add((method.upper(), path.replace("{model_id}", "smollm2-135m-instruct")))
    for route in app.routes:
        if isinstance(getattr(route, "methods", None), set):
            seen.update((m, route.path) for m in route.methods if m != "HEAD")
    return sorted(seen)


def test_route_walk_finds_every_route(secured):
    paths = {path for _, path in _routes(secured.app)}
    assert {"/generate", "/v1/chat/completions", "/openapi.json", "/docs", "/info"} <= paths
    assert PUBLIC_PATHS <= paths


def test_every_protected_route_needs_a_key(secured):
    for method, path in _routes(secured.app):
        if path in PUBLIC_PATHS or path in ui.PUBLIC_PATHS:
            continue
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic Zmlyc3Qta2V5LTEyMw=="},
        ):
            response = secured.request(method, path, headers=headers, json={})
            error = assert_error(response, 401)
            assert error["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"


def test_each_key_opens_every_route(secured):
    for key in GOOD:
        for method, path in _routes(secured.app):
            response = secured.request(
                method, path, headers={"Authorization": f"Bearer {key}"}, json={}
            )
            assert response.status_code != 401, (method, path)
    assert secured.get("/info", headers={"Authorization": f"bearer {GOOD[0]}"}).status_code == 200


def test_probes_are_public(secured):
    for path in sorted(PUBLIC_PATHS):
        assert secured.get(path).status_code == 200


def test_the_pages_are_the_only_other_public_routes(secured):
    # The playground and docs pages (files, no data) load without a key; the API they
    # call does not: /openapi.json needs the key like every route outside these lists.
    public = {path for method, path in _routes(secured.app) if method == "GET"} & ui.PUBLIC_PATHS
    assert public == ui.PUBLIC_PATHS
    for path in sorted(ui.PUBLIC_PATHS):
        assert secured.get(path).status_code == 200, path
    assert "/openapi.json" not in ui.PUBLIC_PATHS


@pytest.mark.parametrize(
    "host", ["evil/health?", "x/ready#", "x/metrics/..", "a@b/health", "testserver/v1/../health"]
)
def test_forged_host_headers_do_not_bypass(secured, host):
    assert_error(secured.get("/v1/models", headers={"Host": host}), 401)
    assert_error(secured.post("/generate", headers={"Host": host}, json={"prompt": "a"}), 401)


@pytest.mark.parametrize(
    ("path", "raw_path"),
    [
        ("/v1/models", b"http://evil/health"),
        ("/health/../v1/models", b"/health/../v1/models"),
        ("/healthz", b"/healthz"),
        ("/health/", b"/health/"),
        ("//health", b"//health"),
    ],
)
def test_scope_path_decides_not_the_raw_target(path, raw_path):
    app = create_app(Settings(api_key=SecretStr(KEYS)), engine_factory=lambda _s: FakeEngine())
    headers = [(b"host", b"evil/health?")]

    async def call():
        return await asgi_call(app, "GET", path, headers=headers)

    result = asyncio.run(call())
    assert result.status == 401
    assert result.json()["error"]["code"] == "invalid_api_key"


def test_key_checker():
    checker = KeyChecker(GOOD)
    assert checker.accepts(b"first-key-123")
    assert checker.accepts(b"second-key-456")
    for bad in (b"", b"first-key-12", b"first-key-1234", b"FIRST-KEY-123", b"first-key-123 "):
        assert not checker.accepts(bad)
    with pytest.raises(ValueError):
        KeyChecker([])


def test_bearer_token_parsing():
    assert bearer_token([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer_token([(b"authorization", b"bearer   abc  ")]) == b"abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([(b"authorization", b"Bearer")]) is None
    assert bearer_token([(b"x-other", b"Bearer abc")]) is None


def test_no_key_configured_means_open(client):
    assert client.get("/v1/models").status_code == 200


@pytest.mark.skipif(sys.flags.optimize > 0, reason="this is the run under -O")
def test_auth_tests_pass_under_python_O():
    here = Path(__file__).resolve()
    env = {**os.environ, "PYTHONOPTIMIZE": "1"}
    result = subprocess.run(
        [sys.executable, "-O", "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider", "-x"],
        cwd=here.parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        " passed" in result.stdout and "skipped" in result.stdout
    )  # this test skipped itself there
