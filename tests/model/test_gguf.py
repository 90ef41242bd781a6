"""GGUF: dequantizers against gguf's reference, tiny models against transformers,
and a corpus of malformed files that must each raise ModelFileError."""

from __future__ import annotations

import copy
import struct
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from model.config import ConfigError
from model.gpt import ROPE_POSITIONS_AT_LOAD
from model.kv_cache import ForwardBatch
from model.loading import ModelFileError, ggml_types, load_gguf, load_model
from model.loading.dequant import SUPPORTED_TYPES, dequantize
from model.loading.gguf_format import read_gguf_header

IDS = [3, 17, 42, 8, 96, 0, 55, 23, 23, 71, 5, 64, 30, 88, 12, 1]
TOL: dict[str, Any] = dict(rtol=1e-4, atol=1e-4)
RNG = np.random.default_rng(0)


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], meta=None) -> Path:
    """A GGUF file; ``meta`` maps key -> (writer method name, value)."""
    w = gguf.GGUFWriter(path, arch)
    for key, (method, value) in (meta or {}).items():
        getattr(w, method)(key, value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    """Tensor data as the writer wants it (float arrays, or raw quantized bytes)."""
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def random_k_blocks(qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random K-quant bytes (gguf cannot quantize these types) with finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scales = RNG.uniform(-1, 1, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[:, -2:] = scales[:, :2]  # d is the last field
    else:
        raw[:, :4] = scales  # d, dmin lead the block
    return raw.reshape(rows, -1)


# -- dequantization -------------------------------------------------------------------

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def test_every_listed_type_is_supported():
    assert set(TYPES) == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    rows, cols = 6, 512
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        data = random_k_blocks(qtype, rows, cols)
    else:
        values = RNG.normal(0, 1, (rows, cols)) * RNG.uniform(0.01, 10, (rows, 1))
        values[0, :64] = 0.0  # all-zero blocks: a zero scale
        data = encode(values, qtype)
    path = write_gguf(tmp_path / "t.gguf", "llama", {"t": (data, qtype)})
    info = read_gguf_header(path).tensors["t"]
    reader = gguf.GGUFReader(path).tensors[0]
    assert (info.offset, info.nbytes, info.shape) == (
        reader.data_offset,
        reader.n_bytes,
        (rows, cols),
    )

    expected = gguf.quants.dequantize(reader.data, qtype).astype(np.float32)
    raw = torch.from_numpy(
        np.fromfile(path, dtype=np.uint8)[info.offset : info.offset + info.nbytes].copy()
    )
    ours = dequantize(raw, qtype, info.shape).float().numpy()
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))  # bit for bit


def test_header_matches_gguf_reader_on_metadata(tmp_path):
    meta = {
        "general.name": ("add_string", "tiny"),
        "x.u32": ("add_uint32", 7),
        "x.f32": ("add_float32", 0.25),
        "x.bool": ("add_bool", True),
        "x.strings": ("add_array", ["a", "é", ""]),
        "x.ints": ("add_array", [1, -2, 3]),
    }
    path = write_gguf(
        tmp_path / "m.gguf", "llama", {"t": (np.ones((2, 32), np.float32), Q.F32)}, meta
    )
    ours = read_gguf_header(path).metadata
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours[key]
        assert (value.tolist() if isinstance(value, np.ndarray) else value) == field.contents(), key


# -- tiny models ----------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF converter does to q/k rows (``LlamaModel.permute``)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# llama.cpp's name of each per-layer Llama tensor -> the Hugging Face one
LLAMA_LAYER_NAMES = dict(
    attn_norm="input_layernorm",
    ffn_norm="post_attention_layernorm",
    attn_q="self_attn.q_proj",
    attn_k="self_attn.k_proj",
    attn_v="self_attn.v_proj",
    attn_output="self_attn.o_proj",
    ffn_gate="mlp.gate_proj",
    ffn_up="mlp.up_proj",
    ffn_down="mlp.down_proj",
)


def llama_gguf_tensors(hf, types: dict[str, Q] | None = None) -> dict[str, tuple[np.ndarray, Q]]:
    """The tensors llama.cpp's converter writes for an HF Llama; ``types`` picks the
    type per GGUF name suffix (default F32)."""
    cfg = hf.config
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in LLAMA_LAYER_NAMES.items():
            for p in ("weight", "bias"):
                key = f"model.layers.{i}.{theirs}.{p}"
                if key not in sd:
                    continue
                w = sd[key]
                if ours == "attn_q":
                    w = llama_cpp_permute(w, cfg.num_attention_heads)
                elif ours == "attn_k":
                    w = llama_cpp_permute(w, cfg.num_key_value_heads)
                out[f"blk.{i}.{ours}.{p}"] = w
    types = types or {}

    def pick(name: str, w: np.ndarray) -> tuple[np.ndarray, Q]:
        qtype = types.get(name.split(".")[-2], Q.F32) if w.ndim == 2 else Q.F32
        return encode(w, qtype), qtype

    return {name: pick(name, w) for name, w in out.items()}


def llama_meta(cfg) -> dict:
    return {
        "general.name": ("add_string", "tiny-llama"),
        "llama.block_count": ("add_uint32", cfg.num_hidden_layers),
        "llama.context_length": ("add_uint32", cfg.max_position_embeddings),
        "llama.embedding_length": ("add_uint32", cfg.hidden_size),
        "llama.feed_forward_length": ("add_uint32", cfg.intermediate_size),
        "llama.attention.head_count": ("add_uint32", cfg.num_attention_heads),
        "llama.attention.head_count_kv": ("add_uint32", cfg.num_key_value_heads),
        "llama.rope.freq_base": ("add_float32", cfg.rope_parameters["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": ("add_float32", cfg.rms_norm_eps),
        "llama.rope.dimension_count": ("add_uint32", cfg.hidden_size // cfg.num_attention_heads),
        "tokenizer.ggml.tokens": ("add_array", [f"t{i}" for i in range(cfg.vocab_size)]),
        # unused, and as long as a real key: "duplicate-key" renames it to one
        "llama.block_coun2": ("add_uint32", 0),
    }


def all_logits(model, ids):
    with torch.no_grad():
        return model(ForwardBatch.build([ids], logits_rows=[list(range(len(ids)))]))


@pytest.mark.parametrize(
    "settings",
    [dict(n_kv_head=2), dict(n_kv_head=1, tied=True), dict(n_kv_head=4, bias=True)],
    ids=str,
)
def test_tiny_llama_gguf_matches_transformers(hf_checkpoint, tmp_path, settings):
    ckpt = hf_checkpoint("llama", **settings)
    path = write_gguf(
        tmp_path / "tiny.gguf", "llama", llama_gguf_tensors(ckpt.hf), llama_meta(ckpt.hf.config)
    )
    loaded = load_model(str(path))
    assert loaded.config.tie_embeddings == settings.get("tied", False)
    assert loaded.config.n_kv_head == settings["n_kv_head"]
    assert loaded.name == "tiny.gguf"
    torch.testing.assert_close(all_logits(loaded.model, IDS), ckpt.logits(IDS), **TOL)


def test_quantized_tiny_llama_matches_transformers_on_the_same_values(hf_checkpoint, tmp_path):
    """Q8_0 and Q4_1 rows (mixed inside the fused qkv) dequantized and un-permuted:
    equal to transformers running the weights that quantization left."""
    ckpt = hf_checkpoint("llama", n_kv_head=2, n_embd=64)
    types = dict(
        attn_q=Q.Q8_0,
        attn_k=Q.Q4_1,
        attn_v=Q.Q4_1,
        attn_output=Q.Q5_0,
        ffn_gate=Q.Q4_1,
        ffn_up=Q.Q4_1,
        ffn_down=Q.Q8_0,
        token_embd=Q.Q8_0,
        output=Q.Q5_1,
    )
    tensors = llama_gguf_tensors(ckpt.hf, types)
    path = write_gguf(tmp_path / "q.gguf", "llama", tensors, llama_meta(ckpt.hf.config))
    model, _ = load_gguf(path)

    # the same types by the Hugging Face name's last part (q_proj, embed_tokens, ...)
    hf_types = {
        LLAMA_LAYER_NAMES[k].split(".")[-1]: q for k, q in types.items() if k in LLAMA_LAYER_NAMES
    }
    hf_types.update(embed_tokens=types["token_embd"], lm_head=types["output"])
    reference = copy.deepcopy(ckpt.hf)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            # what quantization left: quantization is row-wise, so no permute needed
            if p.dim() == 2:
                qtype = hf_types[name.split(".")[-2]]
                p.copy_(
                    torch.from_numpy(
                        gguf.quants.dequantize(encode(p.detach().numpy(), qtype), qtype)
                    )
                )
    expected = reference(torch.tensor([IDS])).logits[0].detach()
    torch.testing.assert_close(all_logits(model, IDS), expected, **TOL)
    assert not torch.allclose(expected, ckpt.logits(IDS), atol=1e-3)  # quantization did change them


def test_tiny_gpt2_gguf_matches_transformers(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("gpt2", tied=True)
    cfg, sd = ckpt.hf.config, {k: v.detach().numpy() for k, v in ckpt.hf.state_dict().items()}
    # llama.cpp's converter: Conv1D weights transposed to (out, in); the head written out.
    tensors = {
        "token_embd.weight": sd["transformer.wte.weight"],
        "position_embd.weight": sd["transformer.wpe.weight"],
        "output_norm.weight": sd["transformer.ln_f.weight"],
        "output_norm.bias": sd["transformer.ln_f.bias"],
        "output.weight": sd["transformer.wte.weight"],
    }
    names = dict(
        attn_norm="ln_1",
        attn_qkv="attn.c_attn",
        attn_output="attn.c_proj",
        ffn_norm="ln_2",
        ffn_up="mlp.c_fc",
        ffn_down="mlp.c_proj",
    )
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            w = sd[f"transformer.h.{i}.{theirs}.weight"]
            tensors[f"blk.{i}.{ours}.weight"] = w if w.ndim == 1 else w.T.copy()
            tensors[f"blk.{i}.{ours}.bias"] = sd[f"transformer.h.{i}.{theirs}.bias"]
    meta = {
        "gpt2.block_count": ("add_uint32", cfg.n_layer),
        "gpt2.context_length": ("add_uint32", cfg.n_positions),
        "gpt2.embedding_length": ("add_uint32", cfg.n_embd),
        "gpt2.feed_forward_length": ("add_uint32", 4 * cfg.n_embd),
        "gpt2.attention.head_count": ("add_uint32", cfg.n_head),
        "gpt2.attention.layer_norm_epsilon": ("add_float32", cfg.layer_norm_epsilon),
    }
    path = write_gguf(
        tmp_path / "g.gguf",
        "gpt2",
        {k: (v.astype(np.float32), Q.F32) for k, v in tensors.items()},
        meta,
    )
    model, config = load_gguf(path)
    assert config.arch == "gpt2"
    torch.testing.assert_close(all_logits(model, IDS), ckpt.logits(IDS), **TOL)


# -- malformed files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory, hf_checkpoint) -> tuple[Path, dict, dict]:
    """A small valid llama GGUF file, its tensors and its metadata."""
    hf = hf_checkpoint("llama", n_kv_head=2, n_layer=1).hf
    tensors, meta = llama_gguf_tensors(hf), llama_meta(hf.config)
    path = write_gguf(tmp_path_factory.mktemp("good") / "good.gguf", "llama", tensors, meta)
    load_gguf(path)  # the base of the corpus is itself fine
    return path, tensors, meta


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


def tensor_info_offset(data: bytes, name: str) -> int:
    """Offset just after a tensor's name in the tensor directory (its n_dims field)."""
    key = name.encode()
    at = data.index(struct.pack("<Q", len(key)) + key, data.index(b"tokenizer.ggml.tokens"))
    return at + 8 + len(key)


LAST = "blk.0.ffn_down.weight"  # the last tensor written by llama_gguf_tensors; 2-D


def byte_cases():
    """(id, mutation of the file bytes, key the error must name or None)."""

    def dims_at(d):  # offset of the first dimension of LAST
        return tensor_info_offset(d, LAST) + 4

    def type_at(d):  # LAST is 2-D: two dimensions, then its type
        return dims_at(d) + 16

    return [
        ("empty", lambda d: b"", None),
        ("wrong-magic", lambda d: b"GGML" + d[4:], None),
        ("version-1", lambda d: patch(d, 4, "<I", 1), None),
        ("version-99", lambda d: patch(d, 4, "<I", 99), None),
        ("big-endian", lambda d: d[:4] + struct.pack(">I", 3) + d[8:], None),
        ("truncated-fixed-header", lambda d: d[:20], None),
        (
            "truncated-in-metadata",
            lambda d: d[: d.index(b"llama.block_count") + 19],
            None,  # caught by the count check: 13 entries cannot fit
        ),
        ("truncated-in-vocab", lambda d: d[: d.index(b"t50") + 1], "tokenizer.ggml.tokens"),
        ("truncated-in-tensor-directory", lambda d: d[: tensor_info_offset(d, LAST) + 6], LAST),
        ("truncated-tensor-data", lambda d: d[:-7], LAST),
        ("absurd-tensor-count", lambda d: patch(d, 8, "<Q", 2**40), None),
        ("absurd-metadata-count", lambda d: patch(d, 16, "<Q", 2**60), None),
        ("absurd-key-length", lambda d: patch(d, 24, "<Q", 2**62), None),
        (
            "absurd-string-length",
            lambda d: patch(d, d.index(b"tiny-llama") - 8, "<Q", 2**61),
            "general.name",
        ),
        (
            "absurd-array-length",
            lambda d: patch(d, d.index(b"tokenizer.ggml.tokens") + 21 + 8, "<Q", 2**59),
            "tokenizer.ggml.tokens",
        ),
        (
            "unknown-value-type",
            lambda d: patch(d, d.index(b"llama.block_count") + 17, "<I", 77),
            "llama.block_count",
        ),
        ("absurd-n-dims", lambda d: patch(d, tensor_info_offset(d, LAST), "<I", 1000), LAST),
        ("zero-dim", lambda d: patch(d, dims_at(d), "<Q", 0), LAST),
        ("absurd-dim", lambda d: patch(d, dims_at(d), "<Q", 2**62), LAST),
        ("unknown-tensor-type", lambda d: patch(d, type_at(d), "<I", 200), LAST),
        ("offset-past-eof", lambda d: patch(d, type_at(d) + 4, "<Q", 2**40), LAST),
        (
            "offset-unaligned",
            lambda d: patch(
                d, type_at(d) + 4, "<Q", struct.unpack_from("<Q", d, type_at(d) + 4)[0] + 4
            ),
            LAST,
        ),
        (
            "invalid-utf8-key",
            lambda d: d.replace(b"llama.block_count", b"llama.block\xffcount"),
            None,
        ),
        (
            "duplicate-key",
            lambda d: d.replace(b"llama.block_coun2", b"llama.block_count"),
            "llama.block_count",
        ),
    ]


@pytest.mark.parametrize(
    ("mutate", "key"), [c[1:] for c in byte_cases()], ids=[c[0] for c in byte_cases()]
)
def test_malformed_bytes_raise_model_file_error(good, tmp_path, mutate, key):
    path, _, _ = good
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(ModelFileError) as err:
        load_gguf(bad)
    assert err.value.path == bad
    assert err.value.key == key, str(err.value)
    assert str(bad) in str(err.value)


def iq4_nl(shape):
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    return RNG.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8), Q.IQ4_NL


def writer_cases():
    """(id, edit of (tensors, metadata, arch), key the error must name, error class)."""
    q = "blk.0.attn_q.weight"
    return [
        (
            "missing-tensor",
            lambda t, m: t.pop("blk.0.ffn_up.weight"),
            "blk.0.ffn_up.weight",
            ModelFileError,
        ),
        (
            "extra-tensor",
            lambda t, m: t.update(
                {"blk.0.attn_extra.weight": (np.ones((4, 32), np.float32), Q.F32)}
            ),
            "blk.0.attn_extra.weight",
            ModelFileError,
        ),
        ("wrong-shape", lambda t, m: t.update({q: (t[q][0][:-2], Q.F32)}), q, ModelFileError),
        ("unsupported-type", lambda t, m: t.update({q: iq4_nl(t[q][0].shape)}), q, ModelFileError),
        (
            "missing-metadata",
            lambda t, m: m.pop("llama.block_count"),
            "llama.block_count",
            ModelFileError,
        ),
        (
            "metadata-wrong-type",
            lambda t, m: m.update({"llama.block_count": ("add_string", "1")}),
            "llama.block_count",
            ModelFileError,
        ),
        (
            "bad-alignment",
            lambda t, m: m.update({"general.alignment": ("add_uint32", 3)}),
            "general.alignment",
            ModelFileError,
        ),
        (
            "unsupported-rope-scaling",
            lambda t, m: m.update({"llama.rope.scaling.type": ("add_string", "yarn")}),
            "llama.rope.scaling.type",
            ModelFileError,
        ),
        (
            "bad-head-counts",
            lambda t, m: m.update({"llama.attention.head_count_kv": ("add_uint32", 3)}),
            None,
            ConfigError,
        ),
        (
            "architecture",
            lambda t, m: m.update({"general.architecture": ("add_string", "mamba")}),
            "general.architecture",
            ModelFileError,
        ),
    ]


@pytest.mark.parametrize(
    ("edit", "key", "error"), [c[1:] for c in writer_cases()], ids=[c[0] for c in writer_cases()]
)
def test_malformed_content_raises_model_file_error(good, tmp_path, edit, key, error):
    _, tensors, meta = good
    tensors, meta = dict(tensors), dict(meta)
    edit(tensors, meta)
    arch = meta.pop("general.architecture", ("", "llama"))[1]  # the writer adds this key itself
    path = write_gguf(tmp_path / "bad.gguf", arch, tensors, meta)
    with pytest.raises(error) as err:
        load_gguf(path)
    assert err.value.key == key, str(err.value)
    assert isinstance(err.value, ModelFileError)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError):
        load_gguf(tmp_path / "nothing.gguf")


# -- claimed sizes: checked against the file and bounds before anything is sized -------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("claimed", [2, 2**31, 2**32 - 1], ids=["2", "2^31", "2^32-1"])
def test_block_count_beyond_the_file_fails_fast(good, tmp_path, claimed):
    """A file claiming more layers than it holds tensors for is refused before the
    load plan loops over the claimed count (which hung on 2^31)."""
    _, tensors, meta = good
    meta = {**meta, "llama.block_count": ("add_uint32", claimed)}
    meta.pop("general.architecture", None)
    path = write_gguf(tmp_path / "layers.gguf", "llama", dict(tensors), meta)
    start = time.perf_counter()
    with pytest.raises(ModelFileError) as err:
        load_gguf(path)
    assert time.perf_counter() - start < 2.0
    assert err.value.key == "llama.block_count", str(err.value)


@pytest.mark.timeout(60)
def test_huge_context_length_is_refused_with_the_typed_error(good, tmp_path):
    _, tensors, meta = good
    meta = {**meta, "llama.context_length": ("add_uint32", 2**32 - 1)}
    meta.pop("general.architecture", None)
    path = write_gguf(tmp_path / "context.gguf", "llama", dict(tensors), meta)
    with pytest.raises(ModelFileError) as err:
        load_gguf(path)
    assert err.value.key == "llama.context_length", str(err.value)
    assert str(2**24) in str(err.value)  # the bound it is held to


@pytest.mark.timeout(60)
def test_long_claimed_context_sizes_rope_tables_from_the_context_in_use(good, tmp_path):
    """A context within the bound (2^22 here) loads without tables for all of it;
    they grow to what a sequence (or the engine's context) uses."""
    _, tensors, meta = good
    meta = {**meta, "llama.context_length": ("add_uint32", 2**22)}
    meta.pop("general.architecture", None)
    path = write_gguf(tmp_path / "long.gguf", "llama", dict(tensors), meta)
    model, config = load_gguf(path)
    assert config.max_seq_len == 2**22
    assert model.rope_cos is not None and model.rope_cos.shape[0] <= ROPE_POSITIONS_AT_LOAD
    model.reserve_positions(5000)
    assert model.rope_cos.shape[0] == 5000


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("llama.embedding_length", 2**40),
        ("llama.feed_forward_length", 2**40),
        ("llama.attention.head_count", 2**20),
        ("llama.attention.head_count_kv", 2**20),
        ("llama.attention.key_length", 2**20),
    ],
)
def test_every_claimed_size_is_bounded(good, tmp_path, key, value):
    _, tensors, meta = good
    meta = {**meta, key: ("add_uint64", value)}
    meta.pop("general.architecture", None)
    path = write_gguf(tmp_path / "size.gguf", "llama", dict(tensors), meta)
    with pytest.raises(ModelFileError) as err:
        load_gguf(path)
    assert err.value.key == key, str(err.value)


def test_a_header_is_parsed_once_inside_gguf_headers_reused(monkeypatch, tmp_path):
    from model.loading import gguf_format
    from model.registry import DEFAULT_MODEL, resolve_model

    parsed: list[Path] = []
    real = gguf_format._parse
    monkeypatch.setattr(gguf_format, "_parse", lambda cur: parsed.append(cur.path) or real(cur))
    path = resolve_model(DEFAULT_MODEL)
    with gguf_format.gguf_headers_reused():
        first = gguf_format.read_gguf_header(path)
        assert gguf_format.read_gguf_header(path) is first
        copy = tmp_path / "copy.gguf"
        copy.write_bytes(path.read_bytes()[: 1 << 20])  # another file: parsed apart
        with pytest.raises(ModelFileError):  # (cut short: its tensors run past the end)
            gguf_format.read_gguf_header(copy)
    assert len(parsed) == 2
    gguf_format.read_gguf_header(path)  # outside the block: parsed again
    assert len(parsed) == 3


def test_gguf_headers_reused_holds_for_its_own_thread_only(monkeypatch):
    """Two loads in two threads: one thread's block ending does not end the other's, and
    neither block leaves its headers behind once both have ended."""
    import threading

    from model.loading import gguf_format
    from model.registry import DEFAULT_MODEL, resolve_model

    parsed: list[str] = []
    real = gguf_format._parse
    monkeypatch.setattr(
        gguf_format,
        "_parse",
        lambda cur: parsed.append(threading.current_thread().name) or real(cur),
    )
    path = resolve_model(DEFAULT_MODEL)
    inside, ended = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with gguf_format.gguf_headers_reused():
            first = gguf_format.read_gguf_header(path)
            inside.set()
            ended.wait(timeout=30)  # the main thread's block has ended by now
            seen.append(gguf_format.read_gguf_header(path) is first)

    worker = threading.Thread(target=other, name="other")
    worker.start()
    assert inside.wait(timeout=30)
    with gguf_format.gguf_headers_reused():
        gguf_format.read_gguf_header(path)  # not the other thread's copy: parsed here
    ended.set()
    worker.join(timeout=30)
    assert seen == [True]  # the other block still reused its own header
    assert sorted(parsed) == ["MainThread", "other"]
    gguf_format.read_gguf_header(path)  # no block open anywhere: parsed again
    assert len(parsed) == 3


def test_our_type_tables_match_the_gguf_package():
    """The loader's own copy of the format's codes (it avoids importing the package):
    every name, value and block geometry as the package has them."""
    for ours, theirs in (
        (ggml_types.GGMLQuantizationType, gguf.GGMLQuantizationType),
        (ggml_types.GGUFValueType, gguf.GGUFValueType),
    ):
        for member in ours:
            assert theirs[member.name] == member.value, member
    for qtype, sizes in ggml_types.GGML_QUANT_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)] == sizes, qtype
    assert set(ggml_types.GGML_QUANT_SIZES) == set(ggml_types.GGMLQuantizationType)
    assert set(ggml_types.GGUFValueType) == set(gguf.GGUFValueType)  # all of them
    # the package's members index our tables, as the tests here pass them
    assert ggml_types.GGML_QUANT_SIZES[Q.Q4_1] == (32, 20)


def test_loading_a_model_does_not_import_the_gguf_package():
    """~40-60 ms of start-up: the loader and tokenizer use their own tables."""
    import subprocess
    import sys

    code = (
        "import sys, model.loading, model.loading.gguf_file, model.tokenizer; "
        "print('gguf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
