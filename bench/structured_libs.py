"""Compare grammar engines for constrained decoding on this machine.

For each of xgrammar, llguidance and outlines-core (whichever is installed):
tokenizer setup time, compile time of every test schema (bench/structured_schemas.py),
schema coverage (compiles, and the valid instance is accepted token by token), and the
per-step cost of computing the token masks of a batch of 16 rows, with the default
model's vocabulary. Run: ``python -m bench.structured_libs [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from bench.structured_schemas import INSTANCES, SCHEMAS
from model.registry import DEFAULT_MODEL, resolve_model
from model.tokenizer import Tokenizer
from service.engine.structured import JSON_OPTIONS

BATCH = 16


@dataclass
class Vocab:
    tokens: list[bytes]  # raw bytes per id, b"" for specials
    eos: list[int]
    size: int
    tokenizer: Tokenizer


@dataclass
class LibResult:
    name: str
    version: str = ""
    setup_s: float = 0.0
    compile_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    accepted: dict[str, bool] = field(default_factory=dict)
    mask_us_batch16: float = 0.0
    mask_us_batch1: float = 0.0


def load_vocab() -> Vocab:
    tok = Tokenizer.from_path(resolve_model(DEFAULT_MODEL))
    tokens = [
        b"" if i in tok.special_token_ids else tok.token_bytes(i) for i in range(tok.vocab_size)
    ]
    return Vocab(tokens, sorted(tok.eos_token_ids), tok.vocab_size, tok)


def _instance_ids(vocab: Vocab, name: str) -> list[int]:
    return vocab.tokenizer.encode(INSTANCES[name], add_special_tokens=False)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _mask_cost(
    names: list[str],
    make: Callable[[str], Any],
    fill: Callable[[list[Any], np.ndarray], None],
    advance: Callable[[Any, int], None],
    vocab: Vocab,
    batch: int,
) -> float:
    """Mean microseconds per step to fill ``batch`` rows' masks, each row walking a valid
    instance of a schema (rows cycle through the schemas)."""
    rows = [names[i % len(names)] for i in range(batch)]
    ids = {n: _instance_ids(vocab, n) for n in set(rows)}
    steps = min(len(v) for v in ids.values())
    words = (vocab.size + 31) // 32
    mask = np.zeros((batch, words), dtype=np.int32)
    times = []
    for _ in range(3):
        matchers = [make(n) for n in rows]
        for step in range(steps):
            start = time.perf_counter()
            fill(matchers, mask)
            times.append(time.perf_counter() - start)
            for m, n in zip(matchers, rows, strict=True):
                advance(m, ids[n][step])
    return statistics.mean(times) * 1e6


def bench_llguidance(vocab: Vocab) -> LibResult:
    import llguidance
    import llguidance.torch

    res = LibResult("llguidance", llguidance.__version__)

    class Wrapper:
        eos_token_id = vocab.eos[0]
        bos_token_id = None
        tokens = vocab.tokens
        special_token_ids = sorted(vocab.tokenizer.special_token_ids)

        def __call__(self, s: bytes) -> list[int]:
            return vocab.tokenizer.encode(s.decode("utf-8", "replace"), add_special_tokens=False)

    tok, res.setup_s = _timed(
        lambda: llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(Wrapper()),
            n_vocab=vocab.size,
            eos_token=vocab.eos,
            slices=llguidance.LLTokenizer.json_slices(),
        )
    )
    templates = {}
    for name, schema in SCHEMAS.items():

        def compile_one(s: dict[str, Any] = schema) -> Any:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(s), defaults=cast(Any, JSON_OPTIONS)
            )
            return llguidance.LLMatcher(tok, grammar, log_level=0)

        times = []
        for _ in range(5):
            m, t = _timed(compile_one)
            times.append(t)
        res.compile_ms[name] = statistics.median(times) * 1e3
        if m.is_error():
            res.errors[name] = m.get_error()
            continue
        templates[name] = m
        probe = m.deep_copy()
        res.accepted[name] = probe.consume_tokens(_instance_ids(vocab, name)) and (
            probe.is_accepting()
        )
    executor = llguidance.LLExecutor(2)

    def fill(matchers: list[Any], mask: np.ndarray) -> None:
        executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], mask.ctypes.data, mask.shape[1] * 4, len(mask)
        )

    names = list(templates)
    make = lambda n: templates[n].deep_copy()  # noqa: E731
    advance = lambda m, t: m.consume_token(t)  # noqa: E731
    res.mask_us_batch16 = _mask_cost(names, make, fill, advance, vocab, BATCH)
    res.mask_us_batch1 = _mask_cost(names, make, fill, advance, vocab, 1)
    return res


def bench_xgrammar(vocab: Vocab) -> LibResult:
    import torch
    import xgrammar as xgr

    res = LibResult("xgrammar", xgr.__version__ if hasattr(xgr, "__version__") else "")
    info, res.setup_s = _timed(
        lambda: xgr.TokenizerInfo(
            vocab.tokens,
            vocab_type=xgr.VocabType.RAW,
            vocab_size=vocab.size,
            stop_token_ids=vocab.eos,
        )
    )
    compiled = {}
    for name, schema in SCHEMAS.items():
        times = []
        try:
            for _ in range(5):
                compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

                def compile_one(c: Any = compiler, s: Any = schema) -> Any:
                    return c.compile_json_schema(
                        json.dumps(s), any_whitespace=False, separators=(", ", ": ")
                    )

                cg, t = _timed(compile_one)
                times.append(t)
        except Exception as exc:  # coverage: a schema it cannot compile
            res.errors[name] = str(exc)[:200]
            continue
        res.compile_ms[name] = statistics.median(times) * 1e3
        compiled[name] = cg
        probe = xgr.GrammarMatcher(cg)
        ok = all(probe.accept_token(t) for t in _instance_ids(vocab, name))
        res.accepted[name] = ok and probe.accept_token(vocab.eos[0])

    def fill(matchers: list[Any], mask: np.ndarray) -> None:
        tensor = torch.from_numpy(mask)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(tensor, i)

    names = list(compiled)
    make = lambda n: xgr.GrammarMatcher(compiled[n])  # noqa: E731
    advance = lambda m, t: m.accept_token(t)  # noqa: E731
    res.mask_us_batch16 = _mask_cost(names, make, fill, advance, vocab, BATCH)
    res.mask_us_batch1 = _mask_cost(names, make, fill, advance, vocab, 1)
    return res


def bench_outlines(vocab: Vocab) -> LibResult:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    res = LibResult("outlines-core", getattr(outlines_core, "__version__", ""))

    def build() -> Any:
        mapping: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab.tokens):
            if b and i not in vocab.eos:
                mapping.setdefault(b, []).append(i)
        return outlines_core.Vocabulary(vocab.eos[0], mapping)

    ovocab, res.setup_s = _timed(build)
    indexes = {}
    for name, schema in SCHEMAS.items():
        times = []
        try:
            for _ in range(2):  # eager DFA-over-vocabulary builds are slow: fewer repeats

                def index(s: Any = schema) -> Any:
                    regex = build_regex_from_schema(json.dumps(s), whitespace_pattern=r"[ ]?")
                    return outlines_core.Index(regex, ovocab)

                idx, t = _timed(index)
                times.append(t)
        except Exception as exc:
            res.errors[name] = str(exc)[:200]
            continue
        res.compile_ms[name] = statistics.median(times) * 1e3
        indexes[name] = idx
        guide = outlines_core.Guide(idx)
        try:
            for t in _instance_ids(vocab, name):
                guide.advance(t)
            res.accepted[name] = guide.is_finished() or vocab.eos[0] in guide.get_tokens()
        except Exception:
            res.accepted[name] = False

    def fill(matchers: list[Any], mask: np.ndarray) -> None:
        for i, g in enumerate(matchers):
            row = mask[i]
            g.write_mask_into(row.ctypes.data, row.size, 4)

    names = list(indexes)
    make = lambda n: outlines_core.Guide(indexes[n])  # noqa: E731
    advance = lambda g, t: g.advance(t)  # noqa: E731
    res.mask_us_batch16 = _mask_cost(names, make, fill, advance, vocab, BATCH)
    res.mask_us_batch1 = _mask_cost(names, make, fill, advance, vocab, 1)
    return res


LIBS = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines-core": bench_outlines}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(LIBS), action="append")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    vocab = load_vocab()
    results = []
    for name in args.only or list(LIBS):
        try:
            res = LIBS[name](vocab)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")  # noqa: T201
            continue
        results.append(res)
        times = list(res.compile_ms.values())
        print(  # noqa: T201
            f"{res.name} {res.version}: setup {res.setup_s * 1e3:.0f} ms; compile median "
            f"{statistics.median(times):.2f} ms max {max(times):.2f} ms; "
            f"covered {sum(res.accepted.values())}/{len(SCHEMAS)}; "
            f"mask per step: batch 1 {res.mask_us_batch1:.0f} us, "
            f"batch {BATCH} {res.mask_us_batch16:.0f} us; errors {res.errors}"
        )
        print("  compile ms:", {k: round(v, 2) for k, v in res.compile_ms.items()})  # noqa: T201
        print("  accepted:", res.accepted)  # noqa: T201
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=1)


if __name__ == "__main__":
    main()
