"""Other servers' dialects on the real server with the default model: prompt logprobs
against transformers, echo, min_tokens, the fields guidellm and LangChain send, the
Responses API through the openai SDK, Ollama's API through the ``ollama`` client, and
the exported tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import ollama
import openai
import pytest
import torch

from tests.integration.live_server import MODEL, REPO

pytestmark = pytest.mark.slow

http = httpx.Client(timeout=120)
TOLERANCE = 2e-3  # float32 logprobs, ours against transformers' log_softmax
TEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "日本語とemoji 😀 を混ぜて",
]


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def reference_logprobs(hf, ids: list[int]) -> list[float]:
    """transformers: log_softmax of the logits at position i, taken at token i + 1."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def tokenize(server: str, text: str, parse_special: bool = False) -> list[int]:
    body = {"prompt": text, "parse_special_tokens": parse_special}
    return http.post(f"{server}/tokenize", json=body).json()["tokens"]


def echo(server: str, prompt, **fields) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    response = http.post(f"{server}/v1/completions", json={**body, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def assert_close(ours: list, theirs: list[float]) -> None:
    assert ours[0] is None and len(ours) == len(theirs) + 1
    worst = max(abs(a - b) for a, b in zip(ours[1:], theirs, strict=True))
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("text", TEXTS, ids=["prose", "code", "unicode"])
def test_echo_prompt_logprobs_match_transformers(server, hf_default_model, text):
    ids = tokenize(server, text)
    theirs = reference_logprobs(hf_default_model, ids)
    by_text = echo(server, text)["choices"][0]
    assert by_text["text"] == text
    assert_close(by_text["logprobs"]["token_logprobs"], theirs)
    by_ids = echo(server, ids, prompt_logprobs=3)["choices"][0]
    assert_close(by_ids["logprobs"]["token_logprobs"], theirs)
    entries = by_ids["prompt_logprobs"]
    for token, entry, value in zip(ids[1:], entries[1:], theirs, strict=True):
        assert abs(entry[str(token)]["logprob"] - value) < TOLERANCE
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:3] == [1, 2, 3] or entry[str(token)]["rank"] <= 3


def test_prompt_logprobs_across_chunks_and_after_a_cached_prefix(server, hf_default_model):
    # Past max_batched_tokens (512): the prefill runs in two chunks.
    base = " ".join(f"item {i} is {i * 7 % 13}." for i in range(120))
    ids = tokenize(server, base)
    assert len(ids) > 512
    theirs = reference_logprobs(hf_default_model, ids)
    assert_close(echo(server, ids)["choices"][0]["logprobs"]["token_logprobs"], theirs)
    # The same prefix again, now in the prefix cache, with a new ending: recomputed.
    longer = ids + tokenize(server, " And the last item is")
    body = echo(server, longer)
    assert_close(
        body["choices"][0]["logprobs"]["token_logprobs"],
        reference_logprobs(hf_default_model, longer),
    )
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_chat_prompt_logprobs_and_generation_together(server, hf_default_model):
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
    response = http.post(
        f"{server}/v1/chat/completions",
        json={**body, "prompt_logprobs": 0, "return_token_ids": True},
    ).json()
    ids = response["prompt_token_ids"]
    theirs = reference_logprobs(hf_default_model, ids)
    ours = [None] + [e[str(t)]["logprob"] for t, e in zip(ids[1:], response["prompt_logprobs"][1:])]
    assert_close(ours, theirs)
    plain = http.post(f"{server}/v1/chat/completions", json=body).json()
    assert plain["choices"][0]["message"] == response["choices"][0]["message"]


def test_min_tokens_holds_off_the_end(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say OK."}],
        "max_tokens": 40,
        "temperature": 0,
    }
    short = http.post(f"{server}/v1/chat/completions", json=body).json()
    assert short["choices"][0]["finish_reason"] == "stop"
    n = short["usage"]["completion_tokens"]
    longer = http.post(f"{server}/v1/chat/completions", json={**body, "min_tokens": n + 5}).json()
    assert longer["usage"]["completion_tokens"] >= n + 5


def test_guidellm_and_langchain_request_shapes(oai):
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    usages = [chunk.usage for chunk in stream]
    assert all(u is not None for u in usages) and usages[-1].completion_tokens == 6
    answer = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        store=False,
        metadata={"run": "1"},
        service_tier="auto",
        user="someone",
        parallel_tool_calls=False,
        extra_body={"reasoning_effort": "low"},
    )
    assert answer.choices[0].message.content


def test_responses_api_through_the_sdk(oai):
    response = oai.responses.create(
        model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=8
    )
    assert response.output_text and response.usage.output_tokens <= 8
    # The helper wants response.completed: give the answer room to end by itself.
    with oai.responses.stream(
        model=MODEL, input="Say hello.", max_output_tokens=64, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and deltas


def test_ollama_client_chat_generate_embed(server):
    client = ollama.Client(host=server)
    options = {"temperature": 0, "num_predict": 6}
    messages = [{"role": "user", "content": "Name a fruit."}]
    whole = client.chat(model=MODEL, messages=messages, options=options)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.content
    assert whole.eval_count <= 6 and whole.prompt_eval_count > 0 and whole.eval_duration > 0
    parts = list(client.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert parts[-1].done and "".join(p.message.content for p in parts) == whole.message.content
    generated = client.generate(model=f"{MODEL}:latest", prompt="Name a fruit.", options=options)
    assert generated.response == whole.message.content
    pieces = list(
        client.generate(model=MODEL, prompt="Name a fruit.", options=options, stream=True)
    )
    assert "".join(p.response for p in pieces) == generated.response and pieces[-1].context
    embedded = client.embed(model=MODEL, input=["a", "b"])
    assert (
        len(embedded.embeddings) == 2 and abs(sum(x * x for x in embedded.embeddings[0]) - 1) < 1e-4
    )
    assert [m.model for m in client.list().models] == [MODEL]
    assert client.show(MODEL).modelinfo["general.architecture"] == "llama"
    assert [m.model for m in client.ps().models] == [MODEL]
    assert http.get(f"{server}/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError):
        client.chat(model="nope", messages=messages)


def test_exported_tokenizer_equals_the_served_one(server, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    subprocess.run(
        [sys.executable, "-m", "service.cli", "tokenizer", "export", str(out)], check=True
    )
    hf = AutoTokenizer.from_pretrained(out)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>\n", "  spaces\tand\nnewlines  "]:
        # transformers parses special-token spellings in a text; the server does when asked
        assert hf(text)["input_ids"] == tokenize(server, text, parse_special=True), text
    messages = [{"role": "user", "content": "hi"}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    served = http.post(f"{server}/tokenize", json={"messages": messages}).json()["tokens"]
    assert hf(rendered, add_special_tokens=False)["input_ids"] == served
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] and config["chat_template"]


LM_EVAL = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

base, tokenizer, tasks_dir = sys.argv[1:4]
manager = TaskManager(include_path=tasks_dir)
common = "model=%s,num_concurrent=1,max_retries=1,timeout=300" % sys.argv[4]
runs = {
    "mc": simple_evaluate(
        model="local-completions",
        model_args=f"{common},base_url={base}/v1/completions,tokenizer={tokenizer}",
        tasks=["gptserve_tiny_mc"], task_manager=manager, log_samples=True,
    ),
    "gen": simple_evaluate(
        model="local-chat-completions",
        model_args=f"{common},base_url={base}/v1/chat/completions",
        tasks=["gptserve_tiny_gen"], task_manager=manager, log_samples=True,
        apply_chat_template=True,
    ),
}
out = {
    name: {"results": r["results"], "resps": [s["filtered_resps"] for t in r["samples"].values() for s in t]}
    for name, r in runs.items()
}
print(json.dumps(out, default=str))
"""


def test_lm_eval_end_to_end_with_the_exported_tokenizer(server, tmp_path):
    """lm-eval's local-completions (loglikelihood: echo + logprobs) on a tiny multiple-choice
    task of this repository, and local-chat-completions (generation), offline."""
    tokenizer = tmp_path / "tok"
    subprocess.run(
        [sys.executable, "-m", "service.cli", "tokenizer", "export", str(tokenizer)], check=True
    )
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tasks = REPO / "tests" / "integration" / "lm_eval_tasks"
    done = subprocess.run(
        [sys.executable, "-c", LM_EVAL, server, str(tokenizer), str(tasks), MODEL],
        cwd=REPO,
        env={**os.environ, **offline, "HF_HOME": str(tmp_path / "hf")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    mc = out["mc"]
    assert 0.0 <= mc["results"]["gptserve_tiny_mc"]["acc,none"] <= 1.0
    # one (loglikelihood, is_greedy) per choice: 3 questions x 3 choices
    scores = [pair for resps in mc["resps"] for pair in resps]
    assert len(scores) == 9 and all(-200.0 < float(s[0]) < 0.0 for s in scores)
    gen = out["gen"]
    assert "exact_match,none" in gen["results"]["gptserve_tiny_gen"]
    assert len(gen["resps"]) == 2 and all(r[0].strip() for r in gen["resps"])
