"""Property-based fuzzing of the GGUF reader and of the metadata -> config path
(GGUF metadata and config.json), bounded and with a fixed seed (derandomized).

The property: whatever the bytes or the metadata, loading either succeeds or
raises the typed ``ModelFileError``, quickly, allocating nothing the file's size
does not justify. ``CORPUS`` and the ``@example``s are the mutants that broke it
once (a huge block count hung the plan; a huge context sized gigabytes of RoPE
tables; a string rope_theta escaped as a bare ValueError).
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from model.config import ModelConfig
from model.loading import ModelFileError, load_gguf
from model.loading.gguf_file import config_from_gguf
from model.loading.gguf_format import read_gguf_header
from model.loading.hf import read_hf_config

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # a fixed seed: the same cases on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SECONDS = 10.0  # per case: generous for a loaded machine, far below a hang
WORK = Path(tempfile.mkdtemp(prefix="gguf-fuzz-"))

VOCAB, EMBD, HEADS, KV_HEADS, FFN = 64, 32, 4, 2, 64


def tiny_llama_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    hd = EMBD // HEADS

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.05, shape).astype(np.float32)

    return {
        "token_embd.weight": w(VOCAB, EMBD),
        "output_norm.weight": np.ones(EMBD, np.float32),
        "blk.0.attn_norm.weight": np.ones(EMBD, np.float32),
        "blk.0.ffn_norm.weight": np.ones(EMBD, np.float32),
        "blk.0.attn_q.weight": w(HEADS * hd, EMBD),
        "blk.0.attn_k.weight": w(KV_HEADS * hd, EMBD),
        "blk.0.attn_v.weight": w(KV_HEADS * hd, EMBD),
        "blk.0.attn_output.weight": w(EMBD, HEADS * hd),
        "blk.0.ffn_gate.weight": w(FFN, EMBD),
        "blk.0.ffn_up.weight": w(FFN, EMBD),
        "blk.0.ffn_down.weight": w(EMBD, FFN),
    }


BASE_META: dict[str, Any] = {
    "llama.block_count": 1,
    "llama.context_length": 128,
    "llama.embedding_length": EMBD,
    "llama.feed_forward_length": FFN,
    "llama.attention.head_count": HEADS,
    "llama.attention.head_count_kv": KV_HEADS,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.rope.freq_base": 10000.0,
}


def write(path: Path, meta: dict[str, Any]) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            if value < 0:
                w.add_int64(key, value)
            else:
                w.add_uint64(key, value) if value >= 1 << 32 else w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, str(value))
    for name, data in tiny_llama_tensors().items():
        w.add_tensor(name, data, raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GOOD = write(WORK / "good.gguf", BASE_META)
GOOD_BYTES = GOOD.read_bytes()
HEADER_END = read_gguf_header(GOOD).tensors["token_embd.weight"].offset


def loads_or_refuses(path: Path) -> None:
    start = time.perf_counter()
    try:
        load_gguf(path)
    except ModelFileError:
        pass
    assert time.perf_counter() - start < SECONDS


def test_the_base_file_loads():
    model, config = load_gguf(GOOD)
    assert config.n_layer == 1 and config.max_seq_len == 128


# -- bytes ---------------------------------------------------------------------------

INTERESTING = [0, 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1]

# Mutants found by this test or by hand: (offset, 8-byte little-endian value) patches.
CORPUS: list[list[tuple[int, int]]] = [
    [(GOOD_BYTES.index(b"llama.block_count") + 21, 2**31)],  # the u32 value: claims 2^31 layers
    [(GOOD_BYTES.index(b"llama.block_count") + 21, 2**32 - 1)],
    [(GOOD_BYTES.index(b"llama.context_length") + 24, 2**32 - 1)],
    [(8, 2**40)],  # tensor count
    [(16, 2**60)],  # metadata count
]


def patched(patches: list[tuple[int, int]], cut: int | None = None) -> bytes:
    data = bytearray(GOOD_BYTES)
    for offset, value in patches:
        offset = min(offset, len(data) - 8)
        if value >= 1 << 32 or offset % 8 == 0:
            data[offset : offset + 8] = struct.pack("<Q", value % 2**64)
        else:
            data[offset : offset + 4] = struct.pack("<I", value)
    return bytes(data[:cut])


@pytest.mark.parametrize("patches", CORPUS, ids=range(len(CORPUS)))
def test_corpus_of_mutants(patches):
    path = WORK / "corpus.gguf"
    path.write_bytes(patched(patches))
    loads_or_refuses(path)


@FUZZ
@given(
    patches=st.lists(
        st.tuples(st.integers(0, HEADER_END), st.sampled_from(INTERESTING) | st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    cut=st.none() | st.integers(0, len(GOOD_BYTES)),
)
def test_mutated_bytes_load_or_raise_the_typed_error(patches, cut):
    path = WORK / "mutant.gguf"
    path.write_bytes(patched(patches, cut))
    loads_or_refuses(path)


# -- metadata -> config --------------------------------------------------------------

VALUES = (
    st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from(INTERESTING)
    | st.floats(allow_nan=True, allow_infinity=True, width=32)
    | st.booleans()
    | st.text(max_size=8)
)


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(sorted(BASE_META)), VALUES, min_size=1, max_size=4))
@example(edits={"llama.block_count": 2**31})
@example(edits={"llama.context_length": 2**32 - 1})
@example(edits={"llama.embedding_length": 2**40})
@example(edits={"llama.rope.freq_base": float("inf")})
@example(edits={"llama.attention.head_count_kv": 0})
def test_metadata_gives_a_config_or_the_typed_error(edits):
    path = write(WORK / "meta.gguf", {**BASE_META, **edits})
    start = time.perf_counter()
    try:
        config = config_from_gguf(read_gguf_header(path))
    except ModelFileError:
        return
    assert time.perf_counter() - start < SECONDS
    assert isinstance(config, ModelConfig) and config.n_layer == 1
    loads_or_refuses(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
HF_LLAMA = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "num_hidden_layers": 1,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_size": EMBD,
    "intermediate_size": FFN,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


@FUZZ
@given(
    edits=st.dictionaries(
        st.sampled_from([*HF_LLAMA, "rope_scaling", "head_dim"]), JSON, max_size=4
    )
)
@example(edits={"rope_theta": "1e4"})
@example(edits={"rope_scaling": "yarn"})
@example(edits={"num_hidden_layers": 2**31})
@example(edits={"max_position_embeddings": 2**40})
def test_config_json_gives_a_config_or_the_typed_error(edits):
    directory = WORK / "hf"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**HF_LLAMA, **edits}))
    try:
        config = read_hf_config(directory)
    except ModelFileError:
        return
    assert isinstance(config, ModelConfig)
