"""Shared helpers of the engine tests: a byte-level tokenizer, tiny models, runners."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.kv_cache import ForwardBatch
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.types import GenerateEvent, GenerateRequest, SamplingParams

BOS, EOS, IM_END = 256, 257, 258
VOCAB = 260
T = TypeVar("T")


class ByteDetokenizer:
    def __init__(self, skip_special_tokens: bool) -> None:
        self.skip = skip_special_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id >= 256:
            return "" if self.skip else f"<{token_id}>"
        return self.decoder.decode(bytes([token_id]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class ByteTokenizer:
    """ids 0..255 are bytes; 256 BOS, 257 EOS, 258 end-of-turn, 259 unused."""

    vocab_size = VOCAB
    bos_token_id = BOS
    special_token_ids = frozenset({BOS, EOS, IM_END, VOCAB - 1})

    def __init__(self, eos_token_ids: Sequence[int] = (EOS, IM_END)) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)

    def detokenizer(self, skip_special_tokens: bool = True) -> ByteDetokenizer:
        return ByteDetokenizer(skip_special_tokens)


def tiny_config(**overrides: Any) -> ModelConfig:
    kw: dict[str, Any] = dict(
        arch="llama",
        vocab_size=VOCAB,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=128,
        max_seq_len=512,
        tie_embeddings=False,  # tied and scaled up, the model would echo its input
    )
    kw.update(overrides)
    return ModelConfig(**kw)


_MODELS: dict[tuple[int, str], GPT] = {}


def tiny_model(seed: int = 0, device: str = "cpu") -> GPT:
    """A random tiny Llama, scaled so that greedy outputs vary (not one repeated
    token) and logit gaps are wide (batch-dependent rounding never flips an argmax)."""
    if (seed, device) not in _MODELS:
        model = GPT.random(tiny_config(), seed=seed, device=device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith("layers.") and "norm" not in name:
                    param.mul_(3.0)
            model.lm_head.weight.mul_(8.0)
        _MODELS[seed, device] = model
    return _MODELS[seed, device]


def make_engine(model: GPT | None = None, tokenizer: Any = None, **config: Any) -> Engine:
    cfg = EngineConfig(
        **{"max_num_seqs": 32, "max_batched_tokens": 64, "kv_cache_tokens": 4096, **config}
    )
    engine = Engine(model or tiny_model(), tokenizer or ByteTokenizer(), cfg, "tiny")
    engine.start()
    return engine


def run(engine: Engine, main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` on a fresh event loop, stop the engine, check no block leaked."""

    async def wrapper() -> T:
        try:
            return await main()
        finally:
            await engine.stop(drain_timeout=5.0)

    result = asyncio.run(wrapper())
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "KV blocks leaked"
    return result


def metric(engine: Engine, name: str, **labels: str) -> float:
    """A sample of the engine's registry (0 when never recorded)."""
    value = engine.registry.get_sample_value(name, {"model_name": "tiny", **labels})
    return 0.0 if value is None else value


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


async def collect(
    engine: Engine, prompt: list[int], params: SamplingParams, request_id: str | None = None
) -> list[GenerateEvent]:
    req = (
        GenerateRequest(prompt, params)
        if request_id is None
        else GenerateRequest(prompt, params, request_id)
    )
    return [ev async for ev in engine.generate(req)]


def tokens_of(events: list[GenerateEvent]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def text_of(events: list[GenerateEvent]) -> str:
    return "".join(ev.text for ev in events)


@torch.inference_mode()
def reference_greedy(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    """Plain greedy loop over the whole sequence, no cache: the ground truth."""
    ids = list(prompt)
    for _ in range(max_tokens):
        logits = model(ForwardBatch.build([ids]))
        ids.append(int(logits[0].argmax()))
    return ids[len(prompt) :]


def prompt_of(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=gen).tolist()
