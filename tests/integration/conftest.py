"""Live-server fixtures: the real server as a subprocess with the default model.

``server`` (session-scoped, in tests/conftest.py) is the base URL of a server
with default settings, shared with the deployment checks. ``server_factory``
starts more servers with custom flags or environment, and stops each of them by
its pid at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.integration.live_server import LiveServer, start_server


@pytest.fixture(scope="session")
def server_factory() -> Iterator[Callable[..., LiveServer]]:
    """``server_factory("--max-queue-requests", "1", env={"GPTSERVE_API_KEY": "k"})``."""
    started: list[LiveServer] = []

    def factory(*flags: str, env: dict[str, str] | None = None, wait: bool = True) -> LiveServer:
        server = start_server(*flags, env=env, wait=wait)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
