"""A real browser for the playground and docs tests: Debian's Chromium driven by Playwright.

Playwright launches the system Chromium (``executable_path``); its own browser download
is never used. Without Chromium or Playwright these tests skip with the reason, except
under CI (``CI`` set), where they fail: ``.ci/install-tools.sh`` installs Chromium there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.browser_testlib import Watch


def _require(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = os.environ.get("GPTSERVE_TEST_CHROMIUM") or shutil.which("chromium")
    if not path:
        _require("no chromium on the PATH: apt-get install chromium (see .ci/install-tools.sh)")
    return str(path)


# Package scope, not session: while Playwright's sync API is started it holds an asyncio
# loop running on this thread, and asyncio.run() in any later test would fail.
@pytest.fixture(scope="package")
def browser(chromium_path: str) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path,
            headless=True,
            # As root (CI, containers) Chromium refuses to start with its sandbox on.
            args=["--no-sandbox", "--disable-gpu"],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests save their screenshots: a temporary folder, or the folder named by
    ``GPTSERVE_SCREENSHOTS`` (``GPTSERVE_SCREENSHOTS=docs/img`` refreshes the README's)."""
    folder = os.environ.get("GPTSERVE_SCREENSHOTS")
    if not folder:
        return tmp_path_factory.mktemp("screenshots")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def watch(browser: Any) -> Iterator[Watch]:
    """A fresh browser context and page, with every request and console error recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    page = context.new_page()
    watched = Watch(page)
    try:
        yield watched
    finally:
        context.close()
