"""The engine on the real default model (SmolLM2-135M-Instruct, float32 on the CPU):
greedy output equals the bare model loop, end-of-turn finishes, multi-byte text is
streamed whole, stop strings work with a real BPE vocabulary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from model.generate import generate as bare_generate
from model.registry import DEFAULT_MODEL
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.output import TextAssembler
from tests.engine.engine_testlib import collect, greedy, text_of, tokens_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine.from_pretrained(DEFAULT_MODEL, EngineConfig(kv_cache_tokens=2048), device="cpu")
    eng.start()
    yield eng
    asyncio.run(eng.stop(1.0))
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def chat(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])[1]


def test_greedy_equals_the_bare_model_loop_and_stops_at_end_of_turn(engine) -> None:
    prompt = chat(engine, "What is the capital of France? Answer in one short sentence.")
    events = asyncio.run(collect(engine, prompt, greedy(60)))
    got = tokens_of(events)
    with torch.inference_mode():
        want = list(
            bare_generate(engine.model, prompt, 60, stop_ids=engine.tokenizer.eos_token_ids)
        )
    assert got == want
    assert events[-1].finish_reason == "stop" and got[-1] in engine.tokenizer.eos_token_ids
    text = text_of(events)
    assert "Paris" in text and "<|im_end|>" not in text
    assert text == engine.tokenizer.decode(got[:-1])


def test_multibyte_characters_are_streamed_whole(engine) -> None:
    text = "Crème brûlée, 世界, 🐉 and ñ."
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several tokens
    asm = TextAssembler(engine.tokenizer.detokenizer(), stop=[])
    deltas = [asm.push(i)[0] for i in ids] + [asm.flush()[0]]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # a character was held back until its last byte arrived


def test_stop_string_with_real_tokens(engine) -> None:
    prompt = chat(engine, "Count from 1 to 10, separated by commas.")
    full = text_of(asyncio.run(collect(engine, prompt, greedy(40))))
    assert "5" in full
    cut = full.index("5")
    events = asyncio.run(collect(engine, prompt, greedy(40, stop=["5"])))
    assert text_of(events) == full[:cut]
    assert events[-1].stop_reason == "5"


def test_multibyte_generation_round_trips(engine) -> None:
    prompt = chat(engine, "Write the French words for 'coffee' and 'summer' with their accents.")
    events = asyncio.run(collect(engine, prompt, greedy(30)))
    ids = [t for t in tokens_of(events) if t not in engine.tokenizer.eos_token_ids]
    assert text_of(events) == engine.tokenizer.decode(ids)
    assert all("\ufffd" not in ev.text for ev in events)
