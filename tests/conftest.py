"""The live server that the integration and deployment tests share."""

from collections.abc import Iterator

import pytest

from tests.integration.live_server import KEYED_FLAGS, KEYS, LiveServer, start_server


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


@pytest.fixture(scope="session")
def keyed_server() -> Iterator[LiveServer]:
    """A second real server, with API keys and a one-request queue (``KEYED_FLAGS``), shared
    by the auth and overload checks and the browser tests of the key prompt."""
    server = start_server(*KEYED_FLAGS, env={"GPTSERVE_API_KEY": ",".join(KEYS)})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers reading the default model's GGUF file (float32), loaded once."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.registry import DEFAULT_MODEL, resolve_model

    path = resolve_model(DEFAULT_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return hf.eval()
