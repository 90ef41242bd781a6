"""The live server that the integration and deployment tests share."""

from collections.abc import Iterator

import pytest

from tests.integration.live_server import LiveServer, start_server


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    """The real server as a subprocess with default settings, one for the whole session."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(live_server: LiveServer) -> str:
    """The base URL of the shared server."""
    return live_server.base_url
