"""Constrained decoding: a request's output held to a JSON schema, a regex, a choice or a grammar.

The grammar engine is llguidance (docs/structured-output.md has the measurements
that chose it). Three parts:

* ``GrammarCompiler`` turns a ``Constraint`` into a matcher template, once per
  distinct constraint (an LRU cache keyed by its kind and text). Compiles run in
  a worker thread, never on the engine thread, bounded by llguidance's parser
  limits and by a timeout; a constraint that does not compile, or not in time, is
  a ``BadRequest`` naming the request field that carried it.
* Each constrained request gets its own matcher (a copy of the template) in its
  ``RequestState``; the engine feeds it every token the request samples.
* ``MaskWorker`` computes the token masks of a step's constrained rows (on CUDA in
  a worker thread while the forward pass runs), then ``MaskJob.apply`` sets the
  disallowed logits of those rows, and only those, to -inf. A step without
  constrained rows does none of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor

from model.kernels import load as load_kernels
from service.engine.types import BadRequest, Constraint

if TYPE_CHECKING:
    import llguidance

    from service.engine.metrics import EngineMetrics

logger = logging.getLogger(__name__)

MAX_CONSTRAINT_CHARS = 64 * 1024  # a schema, regex or grammar's text
MAX_SCHEMA_DEPTH = 32  # nesting of a JSON schema's objects and arrays
MAX_CHOICES = 256
# JSON as Python's json.dumps writes it: no free whitespace, so that a sampled output
# cannot spend its tokens on blanks, and outputs stay short.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _parser_limits() -> llguidance.LLParserLimits:
    import llguidance

    # Tighter than llguidance's defaults: a hostile grammar fails fast instead of
    # taking a worker for seconds (compile) or a step for milliseconds (mask).
    return llguidance.LLParserLimits(
        initial_lexer_fuel=500_000,  # ~10 ms of regex analysis
        step_lexer_fuel=200_000,
        max_grammar_size=200_000,
        max_lexer_states=100_000,
    )


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping once past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _lark_string(text: str) -> str:
    """A Lark string literal matching ``text`` exactly (JSON escapes, as llguidance reads them)."""
    return json.dumps(text, ensure_ascii=False)


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar of a constraint; ``BadRequest`` for what is malformed on its face."""
    import llguidance

    kind, text, param = constraint.kind, constraint.text, constraint.param
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise BadRequest(
            f"{param} may have at most {MAX_CONSTRAINT_CHARS} characters, got {len(text)}", param
        )
    if kind in ("json_schema", "json_object"):
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise BadRequest(f"{param} is not valid JSON: {exc}", param) from exc
        if not isinstance(schema, dict | bool):
            raise BadRequest(f"{param} must be a JSON schema object", param)
        if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
            raise BadRequest(f"{param} nests deeper than {MAX_SCHEMA_DEPTH} levels", param)
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=cast(Any, JSON_OPTIONS))
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        choices = json.loads(text)
        if not choices or len(choices) > MAX_CHOICES:
            raise BadRequest(f"{param} must list 1 to {MAX_CHOICES} strings", param)
        if not all(isinstance(c, str) and c for c in choices):
            raise BadRequest(f"{param} must list non-empty strings", param)
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(_lark_string(c) for c in choices)
        )
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(text)
    raise BadRequest(f"unknown constraint kind {kind!r}", param)


class GrammarCompiler:
    """Constraints -> matcher templates, compiled off the engine thread and cached."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_width: int,
        cache_size: int,
        timeout: float,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_width = vocab_width  # the logits' width; may exceed the tokenizer's vocabulary
        self.cache_size = cache_size
        self.timeout = timeout
        self.metrics = metrics
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        # Two workers: one runaway compile (bounded by the parser limits) leaves one free.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gptserve-grammar")
        self._lltok: Future[llguidance.LLTokenizer] | None = None

    # -- the tokenizer as llguidance sees it ------------------------------------------

    def _tokenizer_future(self) -> Future[llguidance.LLTokenizer]:
        """Built once, on first use (a second or two for a 50k vocabulary), in a worker."""
        with self._lock:
            if self._lltok is None:
                self._lltok = self._pool.submit(
                    build_lltokenizer, self._tokenizer, self.vocab_width
                )
            return self._lltok

    def lltokenizer(self) -> llguidance.LLTokenizer:
        return self._tokenizer_future().result()

    # -- compiling ----------------------------------------------------------------------

    async def compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one request (a copy of the cached template)."""
        # The one-time tokenizer setup is not the constraint's fault: not under its timeout.
        await asyncio.wrap_future(self._tokenizer_future())
        future, hit = self._lookup(constraint)
        if self.metrics is not None:
            self.metrics.constrained(constraint.kind, hit)
        try:
            template = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), self.timeout
            )
        except TimeoutError:
            raise BadRequest(
                f"{constraint.param} did not compile within {self.timeout:g} s; simplify it",
                constraint.param,
            ) from None
        return template.deep_copy()

    def compile_now(self, constraint: Constraint) -> llguidance.LLMatcher:
        """The blocking form (tests, benchmarks): compile in this thread, no cache."""
        return self._compile(constraint)

    def _lookup(self, constraint: Constraint) -> tuple[Future[Any], bool]:
        key = (constraint.kind, constraint.text)
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not future.cancelled():
                self._cache.move_to_end(key)
                return future, True
            future = self._pool.submit(self._compile, constraint)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future, False

    def _compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        import llguidance

        tokenizer = self.lltokenizer()
        start = time.perf_counter()
        try:
            grammar = grammar_text(constraint)
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_parser_limits())
        except BadRequest:
            raise
        except Exception as exc:  # llguidance raises ValueError for some malformed input
            raise BadRequest(
                f"{constraint.param} cannot be used: {_short(str(exc))}", constraint.param
            ) from exc
        if self.metrics is not None:
            self.metrics.compile_time.observe(time.perf_counter() - start)
        if matcher.is_error():
            raise BadRequest(
                f"{constraint.param} cannot be used: {_short(matcher.get_error())}",
                constraint.param,
            )
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def build_lltokenizer(tokenizer: Any, vocab_width: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer: each id's bytes; special tokens are never text.

    Ids past the tokenizer's vocabulary (a model whose logits are wider) get empty
    bytes, which llguidance never allows, so a constrained row never samples them.
    """
    import llguidance

    special = set(tokenizer.special_token_ids)
    tokens = [
        b"" if i in special else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)
    ]
    tokens.extend(b"" for _ in range(max(0, vocab_width - len(tokens))))
    eos = sorted(tokenizer.eos_token_ids)

    class _Wrapper:
        eos_token_id = eos[0] if eos else 0
        bos_token_id = tokenizer.bos_token_id
        special_token_ids = sorted(special)

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, text: bytes) -> list[int]:
            ids: list[int] = tokenizer.encode(
                text.decode("utf-8", errors="replace"), add_special_tokens=False
            )
            return ids

    wrapper = llguidance.TokenizerWrapper(_Wrapper())
    # JSON slices: llguidance's mask shortcut tuned for JSON strings, the common case
    # (measured in bench/structured_libs.py: 13 us mean per mask vs 118 us with the general ones).
    return llguidance.LLTokenizer(
        wrapper,
        n_vocab=len(tokens),
        eos_token=eos or None,
        slices=llguidance.LLTokenizer.json_slices(),
    )


# -- masks ------------------------------------------------------------------------------


class MaskWorker:
    """Computes a step's token masks: on CUDA in a thread of its own while the forward runs
    on the device; on the CPU in the engine thread before the forward.

    On the CPU the forward's OpenMP team already holds every core: mask threads running
    beside it preempt team members, and each parallel region then waits a scheduler time
    slice for them (measured: decode steps several times slower on two cores). There the
    masks run alone, one matcher after another, with no thread of their own (spreading
    them over llguidance's threads before the forward was measured slower too: 4.7 ms
    against 3.8 ms for 16 rows, the OpenMP workers still spinning on the other core).
    """

    def __init__(self, vocab_width: int, overlap: bool) -> None:
        import llguidance

        self.vocab_width = vocab_width
        self.words = (vocab_width + 31) // 32
        self.overlap = overlap
        self._executor = llguidance.LLExecutor(max(1, min(4, os.cpu_count() or 1)))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptserve-mask")

    def start(self, rows: Sequence[int], matchers: Sequence[llguidance.LLMatcher]) -> MaskJob:
        bitmask = np.empty((len(rows), self.words), dtype=np.int32)
        future: Future[Any] = Future()
        if self.overlap:
            pairs = [(m, j) for j, m in enumerate(matchers)]
            future = self._pool.submit(
                self._executor.unsafe_compute_mask_ptr,
                pairs,
                bitmask.ctypes.data,
                self.words * 4,
                len(rows),
            )
        else:
            try:
                for j, matcher in enumerate(matchers):
                    matcher.unsafe_compute_mask_ptr(bitmask[j].ctypes.data, self.words * 4)
                future.set_result(None)
            except Exception as exc:  # raised again by apply(): those rows fail alone
                future.set_exception(exc)
        return MaskJob(list(rows), bitmask, future, self.vocab_width)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class MaskJob:
    """One step's masks, being computed; ``apply`` waits for them and masks the logits."""

    def __init__(self, rows: list[int], bitmask: np.ndarray, future: Future[Any], width: int):
        self.rows = rows
        self.bitmask = bitmask
        self.future = future
        self.width = width

    @torch.inference_mode()
    def apply(self, logits: Tensor) -> None:
        """Disallowed tokens of the constrained rows get -inf; other rows are untouched."""
        self.future.result()
        kernels = load_kernels() if logits.device.type == "cpu" else None
        if (
            kernels is not None
            and logits.dtype == torch.float32
            and logits.is_contiguous()
            and logits.shape[-1] <= self.bitmask.shape[1] * 32
        ):
            kernels.apply_token_mask(logits, self.rows, self.bitmask)  # ~50x cheaper
            return
        bits = np.unpackbits(self.bitmask.view(np.uint8), axis=1, bitorder="little")
        width = logits.shape[-1]
        allowed = torch.from_numpy(bits[:, :width].astype(np.bool_, copy=False))
        if allowed.shape[1] < width:  # never: the mask is as wide as the logits
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]))
        index = torch.tensor(self.rows, device=logits.device)
        rows = logits.index_select(0, index)
        rows.masked_fill_(~allowed.to(logits.device, non_blocking=True), float("-inf"))
        logits.index_copy_(0, index, rows)
