"""Suite-wide checks, and the live server the integration and deployment tests share."""

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest imports test modules by their base name ("rootdir" mode): two test
# files with one name in different folders break collection of the whole suite.
_names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
_dupes = sorted(n for n, c in _names.items() if c > 1)
if _dupes:
    raise RuntimeError(f"test module names must be unique across tests/: {_dupes}")

# The helper that starts a real server lives with the integration tests; the
# deployment checks use it too, even when only their folder is collected.
sys.path.insert(0, str(Path(__file__).parent / "integration"))
from live_server import LiveServer, start_server  # noqa: E402


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
