"""docs/operations.md: the KV-cache sizing example is computed from the real default model."""

from __future__ import annotations

import pytest

from model.registry import DEFAULT_MODEL, ModelNotFoundError, resolve_model
from tests.deploy.deploy_support import REPO

DOC = REPO / "docs" / "operations.md"
GIB = 1 << 30
MIB = 1 << 20


@pytest.fixture(scope="module")
def shape() -> dict[str, int]:
    from model.loading.gguf_format import read_gguf_header

    try:
        path = resolve_model(DEFAULT_MODEL)
    except ModelNotFoundError as exc:  # its message says how to install the package
        pytest.fail(str(exc))
    metadata = read_gguf_header(path).metadata
    keys = {
        "n_layer": "llama.block_count",
        "n_head": "llama.attention.head_count",
        "n_kv_head": "llama.attention.head_count_kv",
        "n_embd": "llama.embedding_length",
        "context": "llama.context_length",
    }
    return {name: int(metadata[key]) for name, key in keys.items()}


def test_bytes_per_token_example(shape: dict[str, int]) -> None:
    text = DOC.read_text()
    head_dim = shape["n_embd"] // shape["n_head"]
    assert f"{shape['n_layer']} layers, {shape['n_kv_head']} KV heads" in text
    assert f"{shape['n_embd']} / {shape['n_head']} = {head_dim} dimensions" in text
    assert f"context {shape['context']} tokens" in text
    for dtype_bytes in (2, 4):
        per_token = 2 * shape["n_layer"] * shape["n_kv_head"] * head_dim * dtype_bytes
        formula = f"2 × {shape['n_layer']} × {shape['n_kv_head']} × {head_dim} × {dtype_bytes} = **{per_token:,} B**"
        assert formula in text
        row = next(line for line in text.splitlines() if formula in line)
        sequence_mib = shape["context"] * per_token // MIB
        assert f"| {sequence_mib} MiB |" in row
        assert f"| {32768 * per_token // MIB:,} MiB |" in row
        assert f"| {GIB // per_token:,} tokens |" in row
