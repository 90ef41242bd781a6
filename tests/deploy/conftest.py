"""A real gptserve process serving the default model, for the checks that need live metrics.

The server is started by the integration tests' helper (tests/integration/live_server.py),
so both suites launch it the same way; fixtures of a sibling folder are not visible here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
from deploy_support import REPO


def integration_helper() -> ModuleType:
    name = "live_server"
    if name in sys.modules:  # already imported by tests/integration/conftest.py
        return sys.modules[name]
    path = REPO / "tests" / "integration" / "live_server.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        pytest.fail(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def live_server() -> Iterator[str]:
    """Base URL of a gptserve process on a free loopback port, ready to serve."""
    server = integration_helper().start_server()
    try:
        yield server.base_url
    finally:
        server.stop()
