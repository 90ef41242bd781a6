"""Fixtures for the HTTP layer on a fake engine: no model, no network."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# The helpers' asserts must survive ``python -O`` too (test_auth runs itself that way).
pytest.register_assert_rewrite("tests.api.api_testlib")

from starlette.testclient import TestClient  # noqa: E402

from tests.api.api_testlib import serve  # noqa: E402
from tests.api.fake_engine import FakeEngine  # noqa: E402


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with serve(engine) as client:
        yield client


@pytest.fixture
def make_client(engine: FakeEngine) -> Callable[..., Any]:
    """``with make_client(**settings) as client`` for a custom configuration."""

    def factory(**overrides: Any) -> Any:
        return serve(engine, **overrides)

    return factory


@pytest.fixture(autouse=True)
def _unfrozen_afterwards() -> Iterator[None]:
    """A served app freezes every object alive once its engine has loaded (see
    ``service.api.runtime``); in this one long-lived test process, hand them back to the
    collector after each test."""
    yield
    gc.unfreeze()
