"""A deterministic stand-in for the engine: byte-level tokens, echoing generation.

The tokenizer maps each UTF-8 byte to its value; ``EOS`` ends a sequence. The
engine "generates" the prompt's tokens again, in a cycle, one event per token,
with text deltas that never split a multi-byte character. It honours
max_tokens, stop strings, stop token ids, logprobs and aborts, and records
what it saw so that tests can check the HTTP layer's behaviour. It refuses
requests with the real engine's checks (token ids, context length, sampling
parameters), which run before a request is recorded, as in the engine.
"""

from __future__ import annotations

import asyncio
import codecs
import math
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from model.chat_template import FinalMessageNotShown, TemplateFailed, TemplateRaised
from model.config import ModelConfig
from service.engine.embedding import tokenize_inputs
from service.engine.request import validate_request
from service.engine.types import (
    EmbedResult,
    EngineDead,
    EngineUnavailable,
    GenerateEvent,
    GenerateRequest,
    QueueFull,
    RequestFailed,
    TokenLogprob,
    Usage,
)

EOS = 257
VOCAB = 300
EMBED_DIM = 8


class FakeTokenizer:
    vocab_size = VOCAB
    eos_token_ids = frozenset({EOS})

    def encode(
        self, text: str, add_special_tokens: bool = True, parse_special: bool = False
    ) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> tuple[str, list[int]]:
        text = self.apply_chat_template(messages, add_generation_prompt, tools=tools, **kwargs)
        if continue_final_message:
            final = str(messages[-1].get("content") or "")
            cut = text.rfind(final) if final else -1
            if cut < 0:
                raise FinalMessageNotShown("the chat template does not show the final message")
            text = text[: cut + len(final)]
        return text, self.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        if any(m["content"] == "__template_error__" for m in messages):
            raise TemplateRaised("the chat template of fake refused: roles must alternate")
        if any(m["content"] == "__template_broken__" for m in messages):
            raise TemplateFailed("the chat template of fake exceeded a limit: time")
        if kwargs:
            text = "".join(f"[{k}={v}]" for k, v in sorted(kwargs.items()))
            return text + "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    def __init__(self, max_model_len: int = 512, token_delay: float = 0.0) -> None:
        self.model_name = "fake"
        self.max_model_len = max_model_len
        self.token_delay = token_delay
        self._tokenizer = FakeTokenizer()
        self.registry = CollectorRegistry()
        self.running_gauge = Gauge("gptserve_requests_running", "running", registry=self.registry)
        self.model_config = ModelConfig(
            arch="llama", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=8, intermediate_size=16
        )
        self.device = "cpu"
        self.dtype = "torch.float32"
        self.started = False
        self.stopping = False
        self.dead = False
        self.queue_full = False
        self.fail_after: int | None = None  # raise RequestFailed after this many tokens
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.requests: list[GenerateRequest] = []
        self.embed_calls: list[tuple[list[Any], str, bool]] = []

    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tokenizer

    def start(self) -> None:
        self.started = True

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self.stopping = True
        deadline = asyncio.get_running_loop().time() + drain_timeout
        while self.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for request_id in list(self.running):
            self.abort(request_id)

    async def encode(
        self, text: str, add_special_tokens: bool = True, parse_special: bool = False
    ) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens, parse_special)

    def _check_accepting(self) -> None:
        if self.dead:
            raise EngineDead("dead")
        if not self.started or self.stopping:
            raise EngineUnavailable("the engine is draining")
        if self.queue_full:
            raise QueueFull("the queue is full", retry_after=2.5)

    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        self._check_accepting()
        validate_request(request, VOCAB, self.max_model_len)
        self.requests.append(request)
        self.running.add(request.request_id)
        self.running_gauge.set(len(self.running))
        return self._stream(request)

    @staticmethod
    def _prompt_logprobs(request: GenerateRequest) -> list[TokenLogprob | None]:
        """Token k of the prompt gets logprob -k/10 and rank 2; the top n are ids 0, 1, ..."""
        n = request.params.prompt_logprobs or 0
        prompt = request.prompt_token_ids
        top = [(t, -0.01 * (t + 1)) for t in range(n)]
        return [None] + [
            TokenLogprob(t, -k / 10, list(top), rank=2) for k, t in enumerate(prompt[1:], start=1)
        ]

    def _at(self, request: GenerateRequest, i: int, event: GenerateEvent) -> GenerateEvent:
        """The first event carries the prompt logprobs, as in the engine."""
        if i == 0 and request.params.prompt_logprobs is not None:
            event.prompt_logprobs = self._prompt_logprobs(request)
        return event

    async def _stream(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        params, prompt = request.params, request.prompt_token_ids
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, out = "", list[int]()
        try:
            for i in range(params.max_tokens):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                if request.request_id not in self.running:
                    yield self._at(request, i, self._final(request, out, "", "abort"))
                    return
                if self.fail_after is not None and i >= self.fail_after:
                    raise RequestFailed("sampling failed")
                token = prompt[i % len(prompt)]
                out.append(token)
                lps = self._logprobs(token, params.logprobs)
                if token == EOS and not params.ignore_eos or token in params.stop_token_ids:
                    yield self._at(request, i, self._final(request, out, "", "stop", lps))
                    return
                delta = decoder.decode(bytes([token]) if token < 256 else b"")
                text += delta
                hit = next((s for s in params.stop if s in text), None)
                if hit is not None:
                    before = _before_stop(text, delta, hit)
                    final = self._final(request, out, before, "stop", lps)
                    final.stop_reason = hit
                    yield self._at(request, i, final)
                    return
                last = i == params.max_tokens - 1
                if last:
                    yield self._at(request, i, self._final(request, out, delta, "length", lps))
                    return
                yield self._at(request, i, GenerateEvent(request.request_id, [token], delta, lps))
        finally:
            # Closed or cancelled before its last event: the real engine aborts it.
            self.abort(request.request_id)
            self.running_gauge.set(len(self.running))

    def _final(
        self,
        request: GenerateRequest,
        out: list[int],
        text: str,
        reason: Any,
        lps: list[TokenLogprob] | None = None,
    ) -> GenerateEvent:
        self.running.discard(request.request_id)  # finished: closing it later is no abort
        usage = Usage(len(request.prompt_token_ids), len(out))
        return GenerateEvent(
            request.request_id, out[-1:], text, lps, finish_reason=reason, usage=usage
        )

    @staticmethod
    def _logprobs(token: int, n: int | None) -> list[TokenLogprob] | None:
        if n is None:
            return None
        top = [((token + k) % VOCAB, -0.5 - k) for k in range(n)]
        return [TokenLogprob(token, -0.5, top)]

    async def embed(
        self, inputs: Sequence[str | Sequence[int]], pooling: Any = "mean", normalize: bool = True
    ) -> EmbedResult:
        self._check_accepting()
        ids = tokenize_inputs(self._tokenizer, inputs, VOCAB, self.max_model_len)
        self.embed_calls.append((list(inputs), pooling, normalize))
        vectors = [[float((sum(t) + k) % 7) + 1.0 for k in range(EMBED_DIM)] for t in ids]
        if normalize:
            vectors = [[v / math.sqrt(sum(x * x for x in vec)) for v in vec] for vec in vectors]
        return EmbedResult(vectors, prompt_tokens=sum(map(len, ids)))

    def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.append(request_id)
        self.running.discard(request_id)

    def check_health(self) -> None:
        if self.dead:
            raise EngineDead("dead")


def _before_stop(text: str, delta: str, stop: str) -> str:
    """The part of ``delta`` that comes before the stop string in ``text``."""
    start = len(text) - len(delta)
    return text[start : max(start, text.index(stop))]
