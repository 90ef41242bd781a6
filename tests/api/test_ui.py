"""The playground and docs pages on the HTTP layer: served from the package, nothing from
another host, public without a key, off with ``web_ui: false``. The browser tests in
tests/browser drive the same pages in Chromium."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from service.api.routes import ui
from service.api.schemas.common import SamplingFields
from tests.api.api_testlib import serve
from tests.api.fake_engine import FakeEngine

PAGES = ("/", "/docs", "/redoc")
OWN_FILES = [path for path, (where, _, _) in ui.FILES.items() if where == "own"]


def test_every_page_and_asset_is_served_with_its_type_and_policy(client):
    for path, (_, _, media_type) in ui.FILES.items():
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == media_type, path
        assert response.headers["content-security-policy"] == ui.CSP, path
        assert response.headers["x-content-type-options"] == "nosniff"
        if path in ui.PATCHES:
            assert response.content == ui.patched(path)
        else:
            assert response.content == ui.file_path(path).read_bytes()
    # Big vendored bundles, not stubs.
    assert len(client.get("/ui/swagger-ui-bundle.js").content) > 500_000
    assert len(client.get("/ui/redoc.standalone.js").content) > 500_000


def test_redoc_is_served_without_its_cdn_logo(client):
    original = ui.file_path("/ui/redoc.standalone.js").read_bytes()
    served = client.get("/ui/redoc.standalone.js").content
    assert b"cdn.redoc.ly" in original and b"cdn.redoc.ly" not in served
    assert len(served) == len(original) - len(b"https://cdn.redoc.ly/redoc/logo-mini.svg") + 6


def test_the_policy_keeps_every_request_on_this_origin():
    directives = dict(part.strip().split(" ", 1) for part in ui.CSP.split(";"))
    assert directives["default-src"] == "'self'"
    for name in ("script-src", "connect-src", "img-src", "font-src"):
        assert "http" not in directives[name] and "*" not in directives[name], name
    assert "unsafe-eval" not in ui.CSP


@pytest.mark.parametrize("path", OWN_FILES)
def test_own_files_name_no_other_host(path):
    text = ui.file_path(path).read_text(encoding="utf-8")
    # The one absolute URL allowed is an XML namespace, which is never fetched.
    urls = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inputs: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name in ("src", "href"):
            if found.get(name):
                self.refs.append(str(found[name]))
        if tag in ("input", "textarea") and found.get("id"):
            self.inputs[str(found["id"])] = found


def _parse(path: str) -> _Refs:
    parser = _Refs()
    parser.feed(ui.file_path(path).read_text(encoding="utf-8"))
    return parser


@pytest.mark.parametrize("page", PAGES)
def test_pages_load_only_served_files(page):
    for ref in _parse(page).refs:
        target = ref if ref.startswith("/") else "/" + ref
        assert target in ui.FILES or target in PAGES, (page, ref)


def test_the_settings_show_the_api_defaults():
    inputs = _parse("/").inputs
    fields = SamplingFields.model_fields
    for name in ("temperature", "top_p", "top_k"):
        shown = inputs[name]
        assert float(str(shown["value"])) == fields[name].default, name
        assert shown["data-default"] == shown["value"], name
    assert fields["seed"].default is None and inputs["seed"]["data-default"] == ""
    assert fields["ignore_eos"].default is False and inputs["ignore_eos"]["data-default"] == "false"


def test_fastapi_cdn_pages_are_gone(client):
    for path in ("/docs", "/redoc"):
        body = client.get(path).text
        assert "cdn.jsdelivr.net" not in body and "fastapi.tiangolo.com" not in body
    assert client.get("/docs/oauth2-redirect").status_code == 404
    assert client.get("/openapi.json").json()["info"]["title"] == "gptserve"


def test_web_ui_off_serves_none_of_it():
    with serve(FakeEngine(), web_ui=False) as client:
        for path in [*ui.FILES, "/openapi.json"]:
            assert client.get(path).status_code == 404, path
        assert client.get("/health").status_code == 200
        assert client.app.openapi()["info"]["title"] == "gptserve"  # still built in code


def test_pages_are_public_but_the_data_behind_them_is_not():
    with serve(FakeEngine(), api_key="page-key") as client:
        client.headers.pop("Authorization")
        for path in ui.FILES:
            assert client.get(path).status_code == 200, path
        for path in ("/openapi.json", "/info", "/v1/models"):
            assert client.get(path).status_code == 401, path
        # Exact paths only: a neighbour of a page is not public.
        for path in ("/ui/", "/ui/other.js", "/docs/", "/ui/../info"):
            assert client.get(path).status_code == 401, path
        auth = {"Authorization": "Bearer page-key"}
        assert client.get("/openapi.json", headers=auth).status_code == 200


def test_the_package_ships_the_static_files():
    # pyproject's package-data must carry every file the routes name.
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "static/*" in data["package-data"]["service.api"]
    for path in OWN_FILES:
        assert ui.file_path(path).parent == ui.STATIC


def test_readme_first_screen_shows_the_playground():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    first_screen = "\n".join((root / "README.md").read_text(encoding="utf-8").splitlines()[:25])
    assert "playground" in first_screen
    assert "](docs/img/playground.png)" in first_screen
    for name in ("playground.png", "docs.png"):
        assert (root / "docs" / "img" / name).stat().st_size > 10_000, name
