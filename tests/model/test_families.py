"""Each model family against transformers: tiny random models loaded from a
checkpoint directory and from a GGUF file, through the production loaders.

Sequences are longer than the sliding window of the Mistral and Gemma 3 models,
so a window that is ignored, off by one or wrong in the paged decode path fails.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from model.config import ConfigError, ModelConfig
from model.gpt import llama_block
from model.kv_cache import ForwardBatch, KVCache
from model.loading import ModelFileError, load_gguf, load_hf_dir
from tests.model.families_testlib import CONTEXT, FAMILIES, WINDOW, build_family, write_gguf

BLOCK = 4
TOL: dict[str, Any] = dict(rtol=1e-4, atol=1e-4)
PROMPT = [5, 61, 33, 7, 90, 14, 2, 48, 48, 19, 70, 26, 3, 84, 11, 59, 37, 6, 95, 40, 41, 9, 17]
assert len(PROMPT) > 2 * WINDOW


class Pair:
    """A transformers model, our model from its directory and from its GGUF."""

    def __init__(self, hf: Any, tmp: Path, family: str) -> None:
        self.hf = hf
        hf.save_pretrained(tmp / "dir")
        self.from_dir, self.config = load_hf_dir(tmp / "dir")
        self.gguf = write_gguf(hf, family, tmp / "model.gguf")

    def reference(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0]


def _gguf_settings(family: str) -> dict[str, Any]:
    # GGUF carries no query_pre_attn_scalar: llama.cpp (and we) use head_dim.
    return dict(query_pre_attn_scalar=16) if family == "gemma3" else {}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory) -> Pair:
    family = request.param
    return Pair(
        build_family(family, **_gguf_settings(family)), tmp_path_factory.mktemp(family), family
    )


def run(model, kv, chunks, starts, tables):
    rows = [list(range(len(c))) for c in chunks]
    batch = ForwardBatch.build(
        chunks, start_pos=starts, block_tables=tables, block_size=BLOCK, logits_rows=rows
    )
    with torch.no_grad():
        return model(batch, kv_cache=kv)


def scattered_tables(lengths: list[int], num_blocks: int, seed: int = 0) -> list[list[int]]:
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    tables = []
    for n in lengths:
        need = -(-n // BLOCK)
        tables.append(pool[:need])
        pool = pool[need:]
    return tables


def test_family_is_detected(pair: Pair):
    family = pair.config.arch
    gguf_model, gguf_config = load_gguf(pair.gguf)
    assert gguf_config.arch == family
    expected = {"llama3": "llama"}.get(pair.hf.config.model_type, pair.hf.config.model_type)
    assert family == expected.removesuffix("_text")


def test_logits_match_transformers_from_dir_and_gguf(pair: Pair):
    reference = pair.reference(PROMPT)
    gguf_model, _ = load_gguf(pair.gguf)
    for model in (pair.from_dir, gguf_model):
        torch.testing.assert_close(run(model, None, [PROMPT], [0], None), reference, **TOL)


def test_cached_decode_equals_full_forward(pair: Pair):
    model = pair.from_dir
    full = run(model, None, [PROMPT], [0], None)
    kv = KVCache(model.config, num_blocks=16, block_size=BLOCK)
    table = scattered_tables([len(PROMPT)], 16, seed=1)
    prefill = 5
    torch.testing.assert_close(
        run(model, kv, [PROMPT[:prefill]], [0], table), full[:prefill], **TOL
    )
    for pos in range(prefill, len(PROMPT)):  # past the window: old blocks are skipped
        logits = run(model, kv, [[PROMPT[pos]]], [pos], table)
        torch.testing.assert_close(logits[0], full[pos], **TOL)


def test_ragged_batch_equals_each_sequence_alone(pair: Pair):
    model = pair.from_dir
    seqs = [PROMPT[:21], PROMPT[2:22], PROMPT[5:12]]
    alone = [run(model, None, [s], [0], None) for s in seqs]
    kv = KVCache(model.config, num_blocks=32, block_size=BLOCK)
    tables = scattered_tables([len(s) for s in seqs], 32, seed=3)
    steps = [
        {0: (0, 11), 1: (0, 6)},
        {0: (11, 1), 1: (6, 13), 2: (0, 3)},  # a chunk that starts past a window
        {0: (12, 1), 1: (19, 1), 2: (3, 1)},  # all decode: the batched path
        {0: (13, 7), 2: (4, 1)},
        {2: (5, 2), 0: (20, 1)},
    ]
    for step in steps:
        ids = list(step)
        decodes = sorted(ids, key=lambda i: step[i][1] != 1)  # decodes first, as scheduled
        chunks = [seqs[i][s : s + n] for i in decodes for s, n in [step[i]]]
        starts = [step[i][0] for i in decodes]
        logits = run(model, kv, chunks, starts, [tables[i] for i in decodes])
        expected = torch.cat([alone[i][s : s + n] for i in decodes for s, n in [step[i]]])
        torch.testing.assert_close(logits, expected, **TOL)


def test_gemma3_query_scale_from_dir(tmp_path: Path):
    """query_pre_attn_scalar other than head_dim (GGUF cannot carry it; a directory can)."""
    hf = build_family("gemma3")
    assert hf.config.query_pre_attn_scalar != hf.config.head_dim
    hf.save_pretrained(tmp_path)
    model, config = load_hf_dir(tmp_path)
    assert config.layer_types == ("sliding", "sliding", "full")
    with torch.no_grad():
        reference = hf(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(run(model, None, [PROMPT], [0], None), reference, **TOL)


def test_yarn_rope_scaling_matches_transformers(tmp_path: Path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    hf = build_family("qwen3", rope_parameters={**yarn, "rope_theta": 10000.0})
    hf.save_pretrained(tmp_path)
    model, config = load_hf_dir(tmp_path)
    assert config.rope_scaling is not None and config.rope_scaling.kind == "yarn"
    with torch.no_grad():
        reference = hf(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(run(model, None, [PROMPT], [0], None), reference, **TOL)


def test_fused_cpu_path_agrees_with_python_path(tmp_path: Path):
    """Llama 3 (RoPE scaling) with quantized weights takes the fused C decode step;
    the same model with the kernels declined must give the same logits."""
    hf = build_family("llama3")
    hf.save_pretrained(tmp_path)
    fused, _ = load_hf_dir(tmp_path, weights="int8")
    plain, _ = load_hf_dir(tmp_path, weights="int8")
    assert fused._decode_plan() is not None, "the fused decode step should take Llama 3"
    plain._fused_kernels = lambda kv_cache: None  # type: ignore[method-assign]
    outs = []
    for model in (fused, plain):
        kv = KVCache(model.config, num_blocks=16, block_size=BLOCK)
        tables = scattered_tables([len(PROMPT)] * 2, 16, seed=4)
        run(model, kv, [PROMPT[:6], PROMPT[:9]], [0, 0], tables)
        steps = [
            run(model, kv, [[PROMPT[6 + i]], [PROMPT[9 + i]]], [6 + i, 9 + i], tables)
            for i in range(4)
        ]
        outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["qwen3", "mistral", "gemma3"])
def test_families_without_the_llama_block_decline_the_fused_path(family: str, tmp_path: Path):
    hf = build_family(family)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf_dir(tmp_path, weights="int8")
    assert model._decode_plan() is None
    assert model._fused_kernels(None) is None


@pytest.mark.parametrize(
    ("family", "changes", "feature"),
    [
        ("gemma3", dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
        ("gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        ("qwen2", dict(use_sliding_window=True), "use_sliding_window"),
        ("llama3", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
        ("llama3", dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_features_are_refused_by_name(family, changes, feature):
    hf = build_family(family).config.to_dict()
    hf.update(changes)
    with pytest.raises(ConfigError, match=feature):
        ModelConfig.from_hf(hf)


def test_gguf_rope_scaling_it_cannot_do_is_refused(tmp_path: Path):
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_head_count(4)
    w.add_block_count(1)
    w.add_string("llama.rope.scaling.type", "yarn")
    w.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    w.add_tensor("blk.0.attn_norm.weight", torch.zeros(32).numpy())  # the claimed layer
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="yarn"):
        load_gguf(tmp_path / "m.gguf")


def test_sliding_window_as_long_as_the_context_is_no_window():
    config = ModelConfig(
        arch="mistral", vocab_size=10, n_layer=1, n_head=2, n_embd=8, intermediate_size=8,
        max_seq_len=CONTEXT, sliding_window=CONTEXT,
    )  # fmt: skip
    assert config.sliding_window == 0 and not config.has_sliding_window
    assert llama_block(config)  # the CPU kernels may run it


def test_info_names_the_family(tmp_path: Path, capsys):
    from service.cli import main

    build_family("gemma3").save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "gemma3" and "GeGLU" in info["differences"]
    assert info["attention"].startswith(f"sliding window of {WINDOW} tokens on 2 of 3 layers")
    assert "sliding layers base 10000" in info["rope"] and info["cpu_kernels"] is False
