"""Quantized weights and the CPU kernels, against dequantize-then-compute in float64.

Every kernel build this CPU can run is checked (``avx2`` where the CPU has it,
and the plain-C ``generic`` one everywhere), so both code paths are exercised
whichever machine runs the suite.
"""

from __future__ import annotations

import resource
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from model import kernels as kmod
from model.gpt import GPT, apply_rope
from model.kernels import Kernels
from model.kv_cache import ForwardBatch, KVCache
from model.loading import load_gguf
from model.loading.dequant import dequantize
from model.loading.plan import copy_rows
from model.loading.repack import FIELD_TYPES, KEPT_TYPES, join_rows, repack, repack_fields
from model.quant import QK, QuantizedWeight, QuantLinear, quantize

RNG = np.random.default_rng(7)


def _build(isa: str) -> Kernels:
    return kmod.load_build(isa)


ISAS = kmod.runnable_isas()[::-1]  # generic, then avx2 and avx512 where the CPU has them
PATHS = {"rows": 0, "tiled": 1, "registers": 2}  # qmm_force_path's values


@pytest.fixture(scope="module", params=ISAS)
def kernels(request) -> Kernels:
    return _build(request.param)


def random_weight(
    kind: str, n: int, k: int, with_min: bool, seed: int = 0, f16: bool = False
) -> QuantizedWeight:
    """Random blocks; ``f16``: float16 scales (as GGUF's Q4_0, Q4_1, Q8_0 keep them)."""
    g = torch.Generator().manual_seed(seed)
    nb = k // QK
    if kind == "q4":
        qs = torch.randint(0, 256, (n, nb * QK // 2), dtype=torch.uint8, generator=g)
    else:
        qs = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    d = torch.rand(n, nb, generator=g) * 0.02
    m = (torch.rand(n, nb, generator=g) - 0.5) * 0.1 if with_min else None
    if f16:
        d = d.half()
        m = None if m is None else m.half()
    return QuantizedWeight(kind, qs, d, m)  # type: ignore[arg-type]


def reference_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    return x.double() @ w.dequantize().double().T


def assert_matmul_close(got: torch.Tensor, x: torch.Tensor, w: QuantizedWeight, base=None) -> None:
    """Within float32 summation error: K ulps of the sum of |terms| (a bound that only
    a wrong value, not a different order of additions, can exceed)."""
    expected = reference_matmul(x, w)
    if base is not None:
        expected = expected + base.double()
    bound = x.shape[1] * 2**-23 * (x.double().abs() @ w.dequantize().double().abs().T) + 1e-6
    if base is not None:
        bound = bound + base.double().abs() * 2**-23
    err = (got.double() - expected).abs()
    assert (err <= bound).all(), (
        f"max error {err.max():.3g}, bound there {bound[err.argmax() // err.shape[1], err.argmax() % err.shape[1]]:.3g}"
    )


# -- matmul kernels ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,with_min,f16",
    [
        ("q4", True, False),
        ("q4", False, False),
        ("q8", False, False),
        ("q8", True, False),
        ("q4", True, True),
        ("q8", False, True),
    ],
)
@pytest.mark.parametrize("n,k", [(39, 96), (5, 32), (130, 576)])
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 7, 10, 13, 64, 130])
@pytest.mark.parametrize("path", list(PATHS))
def test_matmul_equals_dequantize_then_matmul(kernels, kind, with_min, f16, n, k, rows, path):
    """Every batch path of each build, forced at every row count: the row kernels; the
    tiled one (AVX2, AVX-512) that dequantizes a tile of weight rows (one that stays in
    L1 below 128 rows of x, a larger one from 128) and multiplies register tiles of 4
    rows of x by 3 rows of W (8 lanes) or by 6, 3 and 1 (16 lanes); the register one
    (AVX-512) that decodes 4 rows of W into registers for up to 8 rows of x. A path a
    build lacks runs its row kernels. The shapes leave every remainder of
    rows of x (past multiples of 4 and of 8), rows of W (past 6, 4 and 3) and lanes."""
    previous = kernels.lib.qmm_force_path(PATHS[path])
    try:
        w = random_weight(kind, n, k, with_min, f16=f16)
        g = torch.Generator().manual_seed(n * k + rows)
        x = torch.randn(rows, k, generator=g)
        out = torch.empty(rows, n)
        kernels.matmul(x, w, out, accumulate=False)
        assert_matmul_close(out, x, w)
        # accumulate: the product is added to what the output holds (the residual add)
        residual = torch.randn(rows, n, generator=g)
        acc = residual.clone()
        kernels.matmul(x, w, acc, accumulate=True)
        assert_matmul_close(acc, x, w, base=residual)
    finally:
        kernels.lib.qmm_force_path(previous)


@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("f16", [False, True])
def test_kernel_dequantize_is_bit_identical_to_torch(kernels, kind, f16, monkeypatch):
    w = random_weight(kind, 19, 160, with_min=True, f16=f16)
    out = torch.empty(19, 160)
    kernels.dequantize(w, out)
    monkeypatch.setattr("model.quant.load_kernels", lambda: None)
    np.testing.assert_array_equal(
        out.numpy().view(np.uint32), w.dequantize().numpy().view(np.uint32)
    )


@pytest.mark.parametrize("rows", [1, 7, 16, 128, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_on_every_path(rows, bias, monkeypatch):
    """Direct kernel (<= direct_max_rows), dequantize + GEMM (more rows), and no
    kernels at all: the same products, residual add included."""
    w = random_weight("q4", 48, 96, with_min=True, seed=3)
    g = torch.Generator().manual_seed(rows)
    b = torch.randn(48, generator=g) if bias else None
    layer = QuantLinear(w, b)
    x = torch.randn(rows, 96, generator=g)
    zero = torch.zeros(rows, 48)
    assert_matmul_close(layer(x), x, w, base=zero if b is None else b.expand(rows, 48))
    residual = torch.randn(rows, 48, generator=g)
    expected_base = residual if b is None else residual + b
    assert_matmul_close(layer(x, residual.clone()), x, w, base=expected_base)
    monkeypatch.setattr("model.quant.load_kernels", lambda: None)
    assert_matmul_close(layer(x), x, w, base=zero if b is None else b.expand(rows, 48))


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_quantize_float_weights_within_half_a_step(kind):
    w = torch.randn(33, 128) * torch.rand(33, 1) * 3
    q = quantize(w, kind)  # type: ignore[arg-type]
    step = q.d.repeat_interleave(QK, dim=1)
    err = (q.dequantize() - w).abs()
    assert (err <= step / 2 + 1e-6).all()
    assert q.nbytes < w.numel() * w.element_size() / 3


# -- GGUF blocks kept as they are ---------------------------------------------------


def random_blocks(qtype: Q, rows: int, cols: int) -> torch.Tensor:
    """Raw blocks of ``qtype`` with finite float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    n_scales = {Q.Q4_0: 1, Q.Q8_0: 1, Q.Q5_0: 1}.get(qtype, 2)
    scales = RNG.uniform(-1, 1, (raw.shape[0], n_scales)).astype(np.float16).view(np.uint8)
    raw[:, : 2 * n_scales] = scales
    return torch.from_numpy(raw)


@pytest.mark.parametrize("qtype", sorted(KEPT_TYPES), ids=lambda q: q.name)
def test_repacked_blocks_dequantize_to_the_reference_values(qtype):
    rows, cols = 5, 512
    blocks = random_blocks(qtype, rows, cols)
    expected = dequantize(blocks.reshape(-1), qtype, (rows, cols))
    weight = repack(blocks, qtype, rows)
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1):  # the file's float16 scales, kept
        assert weight.d.dtype == torch.float16
    got = weight.dequantize()
    # equal values; bit for bit but for the sign of a zero (Q4_0: d * q - 8 d is +0.0
    # where d * (q - 8) with a negative d is -0.0; no sum can tell them apart)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    if qtype != Q.Q4_0:
        np.testing.assert_array_equal(got.numpy().view(np.uint32), expected.numpy().view(np.uint32))


def _repacked_one_by_one(qtype: Q, parts: list[tuple[np.ndarray, int, int]]) -> QuantizedWeight:
    """The general path: each part's rows fixed on its raw bytes, repacked, then joined."""
    weights = []
    for raw, rows, heads in parts:
        fixed = np.empty_like(raw.reshape(rows, -1))
        copy_rows(fixed, raw.reshape(rows, -1), heads)
        blocks = torch.from_numpy(fixed).view(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        weights.append(repack(blocks, qtype, rows))
    return join_rows(weights)


@pytest.mark.parametrize("scales", ["finite", "overflow", "nan"])
@pytest.mark.parametrize("qtype", sorted(FIELD_TYPES), ids=lambda q: q.name)
def test_blocks_copied_field_by_field_equal_the_general_repack(qtype, scales):
    """q, k and v as the loader joins them: 4 and 2 heads to un-permute, then 8 plain
    rows. Same kind, same bytes, same scale dtypes (float32 where the general path
    keeps them: Q4_0's -8 d past float16's range, a NaN scale)."""
    cols = 96
    parts = []
    for rows, heads in ((16, 4), (8, 2), (8, 0)):
        raw = random_blocks(qtype, rows, cols).numpy()
        if scales == "overflow":
            raw[3, :2] = np.array([60000.0], np.float16).view(np.uint8)
        if scales == "nan":
            raw[5, :2] = np.array([np.nan], np.float16).view(np.uint8)
        parts.append((raw.reshape(-1), rows, heads))
    expected = _repacked_one_by_one(qtype, parts)
    got = repack_fields(qtype, parts)
    assert got.kind == expected.kind
    for name in ("qs", "d", "m"):
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert a.is_contiguous(), name
            np.testing.assert_array_equal(a.numpy().view(np.uint8), b.numpy().view(np.uint8))


def test_joined_parts_of_mixed_kinds_keep_their_values():
    a = random_weight("q4", 6, 64, with_min=True, seed=1)
    b = random_weight("q8", 4, 64, with_min=False, seed=2)
    joined = join_rows([a, b])
    assert joined.kind == "q8"
    torch.testing.assert_close(joined.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    # float16 and float32 scales join (in float32: not every scale is a float16)
    c = random_weight("q4", 3, 64, with_min=True, seed=3, f16=True)
    mixed = join_rows([a, c])
    assert mixed.d.dtype == torch.float32
    torch.testing.assert_close(mixed.dequantize(), torch.cat([a.dequantize(), c.dequantize()]))
    assert join_rows([c, c]).d.dtype == torch.float16


# -- the fused block operations -----------------------------------------------------


def test_rms_norm_and_silu_mul(kernels):
    x = torch.randn(5, 96)
    w = torch.rand(96) + 0.5
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (96,), w, 1e-5))
    g = torch.randn(5, 2 * 40) * 4
    torch.testing.assert_close(kernels.silu_mul(g), F.silu(g[:, :40]) * g[:, 40:])


def test_silu_mul_over_the_whole_float_range(kernels):
    """The kernels' vectorised exp against float64, from where e^-x overflows to where
    it underflows, with the edges and the special values: as close as PyTorch's own
    silu, and the same infinities and NaNs."""
    x = torch.cat([
        torch.linspace(-110.0, 110.0, 200_001),
        torch.tensor([88.72, 88.7228, -87.33, -87.34, 0.0, -0.0, 1e-30, -1e-30]),
        torch.tensor([float("inf"), float("-inf"), float("nan")]),
    ])  # fmt: skip
    g = torch.cat([x, torch.full_like(x, 3.0)]).view(1, -1)
    got = kernels.silu_mul(g)[0]
    expected = (x.double() / (1 + torch.exp(-x.double())) * 3.0).float()
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.isinf(), expected.isinf())
    finite = expected.isfinite()
    rel = (got[finite].double() - expected[finite].double()).abs() / expected[
        finite
    ].double().abs().clamp_min(1e-38)
    torch_rel = (F.silu(x)[finite].double() * 3.0 - expected[finite].double()).abs() / expected[
        finite
    ].double().abs().clamp_min(1e-38)
    assert rel.max() <= max(4e-7, 1.5 * torch_rel.max()), rel.max()


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_store_equals_rope_then_cache_write(kernels, kv_dtype):
    h, kv, hd, t = 6, 2, 16, 5
    config = _config(h, kv, hd)
    model = GPT.random(config)
    cache = KVCache(config, num_blocks=6, block_size=4, dtype=kv_dtype)
    expected_cache = KVCache(config, num_blocks=6, block_size=4, dtype=kv_dtype)
    qkv = torch.randn(t, (h + 2 * kv) * hd)
    positions = torch.tensor([3, 9, 0, 17, 5])
    slots = torch.tensor([22, 1, 7, 12, 0])
    rope = (model.rope_cos[positions][:, None], model.rope_sin[positions][:, None])  # type: ignore[index]
    qk = apply_rope(qkv[:, : (h + kv) * hd].view(t, h + kv, hd), *rope)

    got = qkv.clone()
    kernels.rope_store(
        got, h, kv, hd, positions, (model.rope_cos, model.rope_sin), (slots, cache.k[0], cache.v[0])
    )  # type: ignore[arg-type]
    got_qk = got[:, : (h + kv) * hd].view(t, h + kv, hd)
    torch.testing.assert_close(got_qk, qk)  # the same rotation, up to rounding
    # and exactly what was computed lands in the slots, rounded to the cache's dtype
    expected_cache.write(0, got_qk[:, h:], got[:, (h + kv) * hd :].view(t, kv, hd), slots)
    torch.testing.assert_close(cache.k.float(), expected_cache.k.float(), rtol=0, atol=0)
    torch.testing.assert_close(cache.v.float(), expected_cache.v.float(), rtol=0, atol=0)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h,kv,hd", [(6, 2, 16), (4, 4, 12), (9, 3, 64)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_attention_equals_sdpa_over_gathered_blocks(
    kernels, kv_dtype, h, kv, hd, block_size
):
    config = _config(h, kv, hd)
    cache = KVCache(config, num_blocks=40, block_size=block_size, dtype=kv_dtype)
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    # Lengths that end inside a block on every key step (eight keys, four, one at a time),
    # and enough sequences that a task takes all of a sequence's KV heads.
    lengths = [3 * block_size + 7, 6, 1, 2 * block_size, block_size + 3, 12, 5, 9, 4]
    width = max(-(-n // block_size) for n in lengths)
    blocks = torch.randperm(40).tolist()  # out of order
    tables = torch.zeros(len(lengths), width, dtype=torch.int64)  # padded with block 0
    for b, n in enumerate(lengths):
        for j in range(-(-n // block_size)):
            tables[b, j] = blocks.pop()
    ctx = torch.tensor(lengths)
    q = torch.randn(len(lengths), h, hd) * 4  # scores far apart: exp of large negatives too
    got = kernels.decode_attention(q, cache.k[0], cache.v[0], tables, ctx, 0.3)
    k, v = cache.gather(0, tables)  # (B, L, KV, hd)
    mask = (torch.arange(k.shape[1])[None, :] < ctx[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        k.float().transpose(1, 2),
        v.float().transpose(1, 2),
        attn_mask=mask,
        scale=0.3,
        enable_gqa=True,
    ).squeeze(2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _config(h: int, kv: int, hd: int, n_layer: int = 1):
    from model.config import ModelConfig

    return ModelConfig(
        arch="llama",
        vocab_size=50,
        n_layer=n_layer,
        n_head=h,
        n_kv_head=kv,
        n_embd=h * hd,
        head_dim=hd,
        intermediate_size=64,
        max_seq_len=64,
    )


# -- the model's paths --------------------------------------------------------------


def test_mixed_step_equals_parts_and_decodes_take_the_batched_path():
    """Decodes and a prefill chunk in one step: the decode rows go through the batched
    path (asserted on the path, not timed) and every logit equals running apart."""
    config = _config(6, 2, 16)
    model = GPT.random(config, seed=1)
    prompts = [[3, 14, 15, 9, 2, 6, 5, 35, 8], [27, 18, 28, 18], [1, 2, 3, 4, 5, 6, 7]]
    tables = [[0, 1, 2], [3, 4], [5, 6]]

    def prefill(cache, i):
        b = ForwardBatch.build([prompts[i]], block_tables=[tables[i]], block_size=4)
        return model(b, cache)

    apart = KVCache(config, num_blocks=8, block_size=4)
    mixed = KVCache(config, num_blocks=8, block_size=4)
    with torch.no_grad():
        for i in (0, 1):
            prefill(apart, i)
            prefill(mixed, i)
        decodes = [[7], [11]]
        batch = ForwardBatch.build(
            decodes + [prompts[2][:5]],
            start_pos=[len(prompts[0]), len(prompts[1]), 0],
            block_tables=tables,
            block_size=4,
        )
        step = model.step_inputs(batch, mixed)
        assert step.n_decode == 2 and step.decode is not None
        assert step.decode.tables.shape == (2, 3)  # trimmed to the decodes' own blocks
        together = model(batch, mixed)
        alone = [
            model(ForwardBatch.build([d], start_pos=[s], block_tables=[t], block_size=4), apart)
            for d, s, t in zip(decodes, [9, 4], tables[:2], strict=True)
        ]
        alone.append(
            model(
                ForwardBatch.build([prompts[2][:5]], block_tables=[tables[2]], block_size=4), apart
            )
        )
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_kernels_off_falls_back_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setenv("GPTSERVE_KERNELS", "off")
    kmod.load.cache_clear()
    try:
        with caplog.at_level("INFO", logger="model.kernels"):
            assert kmod.load() is None
        assert "off" in caplog.text
    finally:
        kmod.load.cache_clear()


def test_the_best_build_the_cpu_runs_is_chosen():
    avx512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}
    assert kmod.best_isa(avx512) == "avx512"
    assert kmod.runnable_isas(avx512) == ["avx512", "avx2", "generic"]
    assert kmod.best_isa(avx512 - {"avx512bw"}) == "avx2"  # AVX-512 F alone is not enough
    assert kmod.best_isa({"avx2", "fma"}) == "generic"  # no F16C
    assert kmod.runnable_isas(set()) == ["generic"]


def test_a_forced_build_the_cpu_cannot_run_is_refused(monkeypatch, caplog):
    monkeypatch.setenv("GPTSERVE_KERNELS", "avx512")
    monkeypatch.setattr(kmod, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setattr(kmod, "load_build", lambda isa: Kernels(isa, None, Path(isa)))  # type: ignore[arg-type]
    kmod.load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="model.kernels"):
            loaded = kmod.load()
        assert loaded is not None and loaded.isa == "avx2" and "lacks" in caplog.text
    finally:
        kmod.load.cache_clear()


def test_missing_compiler_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GPTSERVE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kmod, "_cache_dirs", lambda: [tmp_path])
    kmod.load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="model.kernels"):
            assert kmod.load() is None
        assert "unavailable" in caplog.text
    finally:
        kmod.load.cache_clear()


def test_kv_cache_pages_are_not_resident_until_written():
    config = _config(9, 3, 64, n_layer=30)  # the default model's cache
    before = _rss_bytes()
    cache = KVCache.for_tokens(config, 32768, block_size=16)  # 2 x 755 MB of float32
    assert cache.k.numel() * 4 > 200e6
    assert _rss_bytes() - before < 20e6
    cache.k[0, :4].fill_(1.0)  # writing touches only those pages
    assert _rss_bytes() - before < 40e6


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def test_tiny_llama_gguf_kept_quantized_matches_float_load(hf_checkpoint, tmp_path):
    """The quantized path and the dequantized one give the same logits on a GGUF whose
    fused layers mix Q4_1 and Q8_0 rows (q, k permuted on their raw bytes)."""
    from tests.model.test_gguf import llama_gguf_tensors, llama_meta, write_gguf

    ckpt = hf_checkpoint("llama", n_kv_head=2, n_embd=64)
    types = dict(attn_q=Q.Q8_0, attn_k=Q.Q4_1, attn_v=Q.Q4_0, attn_output=Q.Q5_0,
                 ffn_gate=Q.Q4_1, ffn_up=Q.Q4_1, ffn_down=Q.Q8_0, token_embd=Q.Q8_0,
                 output=Q.Q5_1)  # fmt: skip
    tensors = llama_gguf_tensors(ckpt.hf, types)
    path = write_gguf(tmp_path / "q.gguf", "llama", tensors, llama_meta(ckpt.hf.config))
    kept, _ = load_gguf(path, weights="auto")
    floats, _ = load_gguf(path, weights="float")
    assert len(kept.quantized_layers()) > 0 and not floats.quantized_layers()
    ids = [5, 61, 33, 7, 90, 14, 2, 48]
    for rows in ([len(ids) - 1], list(range(len(ids)))):  # kernel rows, and the GEMM path
        batch = ForwardBatch.build([ids], logits_rows=[rows])
        with torch.no_grad():
            torch.testing.assert_close(kept(batch), floats(batch), rtol=1e-4, atol=1e-4)


def test_c_decode_step_equals_the_module_path(hf_checkpoint, tmp_path, monkeypatch):
    """A pure decode step on a quantized model runs in one kernel call, from the
    embedding to the logits; it must give the logits and the cache the PyTorch
    modules give."""
    from tests.model.test_gguf import llama_gguf_tensors, llama_meta, write_gguf

    ckpt = hf_checkpoint("llama", n_kv_head=2, n_embd=64)
    types = dict(attn_q=Q.Q4_1, attn_k=Q.Q4_1, attn_v=Q.Q8_0, attn_output=Q.Q4_0,
                 ffn_gate=Q.Q4_1, ffn_up=Q.Q4_1, ffn_down=Q.Q8_0, token_embd=Q.Q8_0,
                 output=Q.Q8_0)  # fmt: skip
    path = write_gguf(
        tmp_path / "q.gguf", "llama", llama_gguf_tensors(ckpt.hf, types), llama_meta(ckpt.hf.config)
    )
    fast, config = load_gguf(path, weights="auto")
    slow, _ = load_gguf(path, weights="auto")
    slow._plan = False  # the module path
    plan = fast._decode_plan()
    assert plan is not None and plan.embed is not None and plan.head is not None
    steps = []
    whole_step = Kernels.decode_step

    def counted(self, *args, **kwargs):
        steps.append(args[1].shape[0])
        return whole_step(self, *args, **kwargs)

    monkeypatch.setattr(Kernels, "decode_step", counted)
    prompts = [[5, 61, 33, 7, 90, 14, 2], [48, 19, 70], [26, 3, 84, 11, 59]]
    tables = [[4, 0], [2], [5, 1]]
    results = []
    for model in (fast, slow):
        cache = KVCache(config, num_blocks=6, block_size=4, dtype=torch.float16)
        logits = []
        with torch.no_grad():
            for p, t in zip(prompts, tables, strict=True):
                model(ForwardBatch.build([p], block_tables=[t], block_size=4), cache)
            batch = ForwardBatch.build(
                [[9], [8], [7]],
                start_pos=[len(p) for p in prompts],
                block_tables=tables,
                block_size=4,
            )
            logits.append(model(batch, cache))
        results.append((torch.cat(logits), cache.k.float().clone(), cache.v.float().clone()))
    assert steps == [3], "the fast model's decode step should be one kernel call"
    for got, expected in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # An id outside the embedding is refused by the kernel, not read past the table.
    cache = KVCache(config, num_blocks=6, block_size=4)
    with torch.no_grad():
        fast(ForwardBatch.build([[1, 2]], block_tables=[[0]], block_size=4), cache)
        bad = ForwardBatch.build(
            [[config.vocab_size]], start_pos=[2], block_tables=[[0]], block_size=4
        )
        with pytest.raises(IndexError, match="outside the embedding"):
            fast(bad, cache)


@pytest.mark.parametrize("weights,kinds", [("int8", {"q8"}), ("int4", {"q4", "q8"})])
def test_float_checkpoint_quantized_on_load(hf_checkpoint, weights, kinds):
    """--weights int8/int4 quantize a float checkpoint's linear layers (embeddings and
    output layer to 8 bits); logits stay near the float model's."""
    from model.loading import load_hf_dir

    ckpt = hf_checkpoint("llama", n_kv_head=2, n_embd=64)
    floats, _ = load_hf_dir(ckpt.path)
    quant, _ = load_hf_dir(ckpt.path, weights=weights)
    layers = quant.quantized_layers()
    assert {layer.kind for layer in layers} == kinds
    assert len(layers) == 4 * quant.config.n_layer + 1 + (not quant.config.tie_embeddings)
    ids = [5, 61, 33, 7, 90, 14, 2, 48]
    batch = ForwardBatch.build([ids], logits_rows=[list(range(len(ids)))])
    with torch.no_grad():
        a, b = quant(batch), floats(batch)
    rel = (a - b).norm() / b.norm()
    assert 0 < rel < (0.02 if weights == "int8" else 0.5)  # a random tiny model: 4 bits move it
