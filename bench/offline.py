"""Offline baselines, no engine and no HTTP: gptserve's bare model and transformers.

Both sides count tokens the same way: new tokens / wall time of the whole
generation (prefill included), greedy, fixed length. The decode-step figures
time one batched decode forward over a paged cache, nothing else.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_bench import decode_batch, decode_cache, seconds_per_call
from model.generate import decode_one_token, generate, prefill
from model.gpt import GPT
from model.kv_cache import KVCache


@torch.inference_mode()
def bare_generate_tps(model: GPT, prompt_ids: list[int], new_tokens: int) -> float:
    """Batch-1 greedy generation with the plain loop: new tokens per second."""
    start = time.perf_counter()
    n = sum(1 for _ in generate(model, prompt_ids, new_tokens))
    return n / (time.perf_counter() - start)


@torch.inference_mode()
def bare_token_latency(model: GPT, prompt_ids: list[int], steps: int) -> float:
    """Seconds per decode token at batch 1 (prefill excluded), for the engine-overhead figure."""
    total = len(prompt_ids) + steps + 1
    cache = KVCache.for_tokens(model.config, total, dtype=model.dtype, device=model.device)
    table = list(range(cache.num_blocks))
    token = int(prefill(model, cache, prompt_ids, total).argmax())
    start = time.perf_counter()
    for i in range(steps):
        token = int(decode_one_token(model, cache, token, len(prompt_ids) + i, table).argmax())
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def decode_step_tps(model: GPT, batch: int, context: int, iters: int = 20) -> float:
    """Tokens/s of one decode step for ``batch`` sequences at ``context`` tokens each."""
    cache = decode_cache(model, batch, context)
    fb = decode_batch(model, cache, batch, context)
    return batch / seconds_per_call(lambda: model(fb, cache), model.device, iters=iters)


def hf_load(path: Path) -> tuple[Any, float]:
    """transformers' model from the same GGUF (dequantized to float32) and its load time."""
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM

    if path.is_dir():
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    return hf.eval(), time.perf_counter() - start


@torch.inference_mode()
def hf_generate_tps(hf: Any, prompt_ids: list[int], batch: int, new_tokens: int) -> float:
    """transformers ``generate()`` on ``batch`` copies of the prompt, greedy, fixed length."""
    ids = torch.tensor([prompt_ids] * batch)
    start = time.perf_counter()
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * batch / elapsed


@torch.inference_mode()
def hf_greedy_ids(hf: Any, prompt_ids: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
    )
    return [int(t) for t in out[0, len(prompt_ids) :]]
