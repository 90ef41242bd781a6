"""The engine: one thread runs schedule -> forward -> sample -> emit over all requests.

Requests arrive from the asyncio side (``generate``, ``embed``, ``abort``),
which only touches the scheduler's queue under a lock and wakes the thread.
The thread owns everything else. Each step it applies aborts, runs pending
embeddings, asks the scheduler for chunks, runs one forward pass, samples the
chunks that end a sequence's known tokens, advances the scheduler past the
computed chunks, and hands the resulting events to each request's
``asyncio.Queue`` with one ``call_soon_threadsafe`` per event loop. When
there is nothing to do it sleeps on a condition variable.

Errors: a ``RequestError`` raised while validating fails that call; an error
while sampling or detokenizing one request ends that request alone with
``RequestFailed``; an error in the forward pass or the loop kills the engine:
every request in flight, and every later one, gets ``EngineDead``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry
from torch import Tensor

from model.gpt import GPT
from model.quant import WeightsMode, describe_weights
from model.sampling import SamplingRow
from service.engine.block_manager import BlockManager
from service.engine.config import EngineConfig
from service.engine.embedding import EmbedJob, tokenize_inputs
from service.engine.metrics import EngineMetrics
from service.engine.output import TextAssembler
from service.engine.request import (
    RequestState,
    next_event,
    sampling_row,
    usage,
    validate_request,
)
from service.engine.runner import ModelRunner, kv_cache_blocks
from service.engine.sampler import Sampled, sample_rows
from service.engine.scheduler import ScheduledChunk, Scheduler, Seq, SeqStatus, Step
from service.engine.structured import GrammarCompiler, MaskJob, MaskWorker
from service.engine.types import (
    BadRequest,
    EmbedResult,
    EngineDead,
    EngineUnavailable,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    Pooling,
    RequestFailed,
    TokenLogprob,
)

logger = logging.getLogger(__name__)


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


T = TypeVar("T")


def _in_passing_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that ends when it returns.

    Every thread that runs torch CPU ops keeps an OpenMP pool of its own for
    as long as it lives. Once pool threads outnumber the cores, libgomp
    throttles spinning and the engine thread's pool sleeps and wakes on every
    op: decode steps slowed markedly while the loading thread (an executor
    thread that never exits) still held its pool (docs/benchmarks.md, "Engine
    overhead and the OpenMP finding"). Loading
    in a thread that is joined frees that pool; the engine thread is then the
    only one that computes.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="gptserve-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def release_free_heap() -> bool:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``).

    Loading leaves its scratch (file buffers, float copies of blocks being
    repacked, the tokenizer's intermediate tables) free inside glibc's arenas,
    where it stays resident: ~30 MiB of the default model's RSS once ready.
    False where there is no glibc (musl, macOS): nothing to do there.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


class Engine:
    """Continuous batching over a paged KV cache (implements ``EngineClient``)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        config: EngineConfig,
        model_name: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.model_config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, model_name)
        num_blocks = kv_cache_blocks(model, config)
        self.max_model_len = self._context_len(num_blocks * config.block_size)
        model.reserve_positions(self.max_model_len)  # position tables: the context in use
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.runner = ModelRunner(model, config, num_blocks, self.max_model_len)
        self.weights = describe_weights(model, model.dtype)
        self.kv_cache_dtype = str(self.runner.kv_cache.dtype).removeprefix("torch.")
        self._eos_ids = frozenset(tokenizer.eos_token_ids)
        # Constrained decoding: compiles in worker threads; masks start with the first
        # constrained step (the engine thread creates the worker then).
        self.grammars = GrammarCompiler(
            tokenizer,
            model.config.vocab_size,
            config.structured_cache_size,
            config.structured_compile_timeout,
            self.metrics,
        )
        self._masks: MaskWorker | None = None
        self._cond = threading.Condition()
        self._seqs: dict[str, Seq] = {}
        self._aborts: set[str] = set()
        self._embeds: deque[EmbedJob] = deque()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._state = "new"  # new -> running -> draining -> stopped, or -> dead
        self._stop_now = False
        self._dead: BaseException | None = None

    def _context_len(self, cache_tokens: int) -> int:
        model_len = self.model_config.max_seq_len
        wanted = self.config.max_model_len or model_len
        if wanted > model_len:
            raise ValueError(f"max_model_len {wanted} exceeds the model's context of {model_len}")
        if wanted > cache_tokens:
            logger.warning(
                "the KV cache holds %d tokens: max_model_len lowered from %d", cache_tokens, wanted
            )
        return min(wanted, cache_tokens)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        config: EngineConfig | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        registry: CollectorRegistry | None = None,
        weights: WeightsMode = "auto",
        model_name: str | None = None,
    ) -> Engine:
        """Load a model and its tokenizer by registry name or path (``weights``: see
        ``model.loading.load_model``). ``model_name`` labels the metrics (default:
        the loaded model's name)."""
        from model.loading import load_model
        from model.loading.gguf_format import gguf_headers_reused
        from model.tokenizer import Tokenizer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"

        def build() -> Engine:
            with gguf_headers_reused():  # the weights' and the tokenizer's
                loaded = load_model(name_or_path, dtype=dtype, device=device, weights=weights)
                tokenizer = Tokenizer.from_path(loaded.path)
            name = model_name or loaded.name
            return cls(loaded.model, tokenizer, config or EngineConfig(), name, registry)

        engine = _in_passing_thread(build)
        release_free_heap()
        return engine

    # -- properties for the HTTP layer ----------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.blocks.usage

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start the engine thread and wait until it has warmed up (blocking)."""
        if self._state != "new":
            raise RuntimeError(f"start() on an engine that is {self._state}")
        self._thread = threading.Thread(target=self._run, name="gptserve-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineUnavailable("the engine did not warm up in time")
        if self._dead is not None:
            raise EngineDead(f"the engine failed to start: {self._dead!r}")
        with self._cond:
            if self._state == "new":
                self._state = "running"

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish within ``drain_timeout``
        seconds, end the rest with ``finish_reason="abort"``, join the thread."""
        with self._cond:
            if self._state in ("running", "new"):
                self._state = "draining"
        thread = self._thread
        deadline = time.monotonic() + drain_timeout
        while thread is not None and thread.is_alive() and self.scheduler.has_work():
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        with self._cond:
            self._stop_now = True
            self._cond.notify()
        if thread is not None:
            await asyncio.to_thread(thread.join)
        if self._state != "dead":
            self._state = "stopped"

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDead(f"the engine loop died: {self._dead!r}")
        if (
            self._state in ("running", "draining")
            and self._thread is not None
            and not self._thread.is_alive()
        ):
            raise EngineDead("the engine thread is gone")

    def _check_accepting(self) -> None:
        """Raise unless new work is accepted (checked first, then again under the lock)."""
        if self._dead is not None or self._state == "dead":
            raise EngineDead(f"the engine loop died: {self._dead!r}")
        if self._state != "running":
            state = {"new": "not started"}.get(self._state, self._state)
            raise EngineUnavailable(f"the engine is {state}")

    # -- requests -------------------------------------------------------------------

    async def encode(
        self, text: str, add_special_tokens: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Tokenize in a worker thread: a long prompt never blocks the event loop.
        Special-token spellings stay plain text unless ``parse_special``."""
        return await asyncio.to_thread(
            self.tokenizer.encode, text, add_special_tokens, parse_special
        )

    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        """Validate and enqueue now (raising ``RequestError``, ``QueueFull``,
        ``EngineUnavailable`` or ``EngineDead`` at call time), then return the
        event stream. Closing or cancelling the stream aborts the request; it
        raises ``RequestFailed`` or ``EngineDead`` if the request fails later."""
        self._check_accepting()
        validate_request(request, self.model_config.vocab_size, self.max_model_len)
        seq = self._new_sequence(request)
        constrained = request.params.constraint is not None
        if not constrained:
            self._enqueue(seq)
        # A constrained request is queued once its grammar has compiled (off this thread);
        # a compile error is then the stream's first item, before any event.
        stream = self._stream(seq, compile_first=constrained)
        # A stream dropped before its first iteration never runs its ``finally``.
        seq.state.finalizer = weakref.finalize(stream, self.abort, request.request_id)
        return stream

    def _enqueue(self, seq: Seq) -> None:
        with self._cond:
            self._check_accepting()
            if seq.request_id in self._seqs:
                raise BadRequest(f"request id {seq.request_id!r} is already in flight")
            self.scheduler.add(seq)
            self._seqs[seq.request_id] = seq
            self._cond.notify()

    def _new_sequence(self, request: GenerateRequest) -> Seq:
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        state = RequestState(
            params=params,
            seed=seed,
            text=TextAssembler(
                self.tokenizer.detokenizer(skip_special_tokens=params.skip_special_tokens),
                params.stop,
            ),
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            eos_ids=self._eos_ids,
            arrival=time.perf_counter(),
        )
        ids = list(request.prompt_token_ids)
        seq = Seq(request.request_id, ids, len(ids), params.max_tokens, state=state)
        seq.prompt_logprobs = params.prompt_logprobs is not None
        return seq

    async def _stream(
        self, seq: Seq, compile_first: bool = False
    ) -> AsyncGenerator[GenerateEvent, None]:
        queue = seq.state.queue
        done = False
        try:
            if compile_first:
                constraint = seq.state.params.constraint
                assert constraint is not None
                try:
                    seq.state.matcher = await self.grammars.compile(constraint)
                    self._enqueue(seq)
                except BaseException:
                    done = True  # never queued: nothing to abort
                    raise
            while not done:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finish_reason is not None
                yield item
        finally:
            if not done:
                self.abort(seq.request_id)
            elif seq.state.finalizer is not None:  # set by generate() before any iteration
                seq.state.finalizer.detach()

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request ends with ``finish_reason="abort"`` within a step."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    async def embed(
        self,
        inputs: Sequence[str | Sequence[int]],
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> EmbedResult:
        """Pooled (mean or last token) final hidden states, L2-normalised unless told
        otherwise. Runs in the engine loop, a step's token budget at a time; no KV
        blocks are kept."""
        self._check_accepting()
        if pooling not in ("mean", "last"):
            raise BadRequest(f"pooling must be 'mean' or 'last', got {pooling!r}", param="pooling")
        token_lists = await asyncio.to_thread(
            tokenize_inputs,
            self.tokenizer,
            inputs,
            self.model_config.vocab_size,
            self.max_model_len,
        )
        loop = asyncio.get_running_loop()
        job = EmbedJob(token_lists, pooling, normalize, loop, loop.create_future())
        with self._cond:
            self._check_accepting()
            self._embeds.append(job)
            self._cond.notify()
        embeddings = await job.future
        return EmbedResult(embeddings, prompt_tokens=sum(len(t) for t in token_lists))

    # -- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.runner.warm_up()
        except BaseException as exc:
            self._die(exc)
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._wait_for_work():
                self._step()
            self._shutdown()
        except BaseException as exc:
            self._die(exc)

    def _wait_for_work(self) -> bool:
        """Sleep until there is work; False when the engine must stop."""
        with self._cond:
            while not (self._stop_now or self._aborts or self._embeds or self.scheduler.has_work()):
                self._cond.wait()
            return not self._stop_now

    def _step(self) -> None:
        self._apply_aborts()
        self._run_embeds()
        with self._cond:
            step = self.scheduler.schedule()
        self._account(step)
        if step.chunks:
            tables = [self.blocks.tables[c.seq.request_id].blocks for c in step.chunks]
            sampling = [c for c in step.chunks if c.produces_token]
            guess = self._guess_rows(sampling)
            masks = self._start_masks(sampling, skip=guess)  # on CUDA beside the forward
            prompt_rows = [c.prompt_rows for c in step.chunks]
            logits = self.runner.forward(step.chunks, tables, prompt_rows)
            if any(prompt_rows):  # the prompt rows' logprobs taken: the sampling rows stay
                logits = self._take_prompt_logprobs(step.chunks, prompt_rows, logits)
            failed: dict[int, Exception] = {}
            if masks is not None:
                try:
                    masks.apply(logits)
                except Exception as exc:  # those rows fail alone, as a sampling error would
                    failed = dict.fromkeys(masks.rows, exc)
            sampled = self._sample(sampling, logits, failed)
            if guess:
                self._check_guesses(sampling, guess, logits, sampled)
            self._advance(step)
            self._emit(sampling, sampled)
        self._flush_outbox()
        self._update_gauges()

    # schedule ------------------------------------------------------------------------

    def _account(self, step: Step) -> None:
        m, now = self.metrics, time.perf_counter()
        m.iteration_tokens.observe(step.num_tokens)
        m.prefix_queries.inc(step.prefix_queries)
        m.prefix_hits.inc(step.prefix_hits)
        if step.preempted:
            m.preemptions.inc(len(step.preempted))
        for seq in step.admitted:
            st: RequestState = seq.state
            if st.first_scheduled is None:
                st.first_scheduled = now
                m.queue_time.observe(now - st.arrival)
                m.prompt_tokens.inc(seq.num_prompt_tokens)

    # sample --------------------------------------------------------------------------

    def _start_masks(
        self, chunks: list[ScheduledChunk], skip: frozenset[int] = frozenset()
    ) -> MaskJob | None:
        """Start the token masks of the constrained rows (but those in ``skip``); None
        when there are none."""
        rows = [
            i for i, c in enumerate(chunks) if c.seq.state.matcher is not None and i not in skip
        ]
        if not rows:
            return None
        return self._mask_worker().start(rows, [chunks[i].seq.state.matcher for i in rows])

    def _mask_worker(self) -> MaskWorker:
        """The engine's one mask worker, made on first use."""
        if self._masks is None:
            self._masks = MaskWorker(self.model_config.vocab_size, self.device.type == "cuda")
        return self._masks

    def _guess_rows(self, chunks: list[ScheduledChunk]) -> frozenset[int]:
        """Constrained rows whose mask can wait for their draw, on the CPU: those whose
        sampling commutes with the mask (no top-k, top-p or min-p, which depend on the
        set of tokens left; no logprobs, which report the masked distribution). Their
        draw over the whole vocabulary is made first and a mask computed only if the
        grammar refuses it (``_check_guesses``). On CUDA every mask is computed beside
        the forward instead."""
        if self.device.type == "cuda":
            return frozenset()
        rows = []
        for i, chunk in enumerate(chunks):
            p = chunk.seq.state.params  # what its sampling row is built from
            free = p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0.0 and p.logprobs is None
            if chunk.seq.state.matcher is not None and free:
                rows.append(i)
        return frozenset(rows)

    def _check_guesses(
        self,
        chunks: list[ScheduledChunk],
        rows: frozenset[int],
        logits: Tensor,
        sampled: list[Sampled],
    ) -> None:
        """Keep each guessed row's draw the grammar takes; draw the others again under
        their mask, in place in ``sampled``.

        A draw is the argmax of the row's (penalised, biased, tempered) logits plus
        noise fixed by the request's seed and step; the mask only sets some logits to
        -inf, which every one of those steps keeps at -inf. So when the unmasked argmax
        is an allowed token it is also the masked argmax: the same token the masked
        path draws, at the cost of one check instead of a mask over the vocabulary
        (refused on the default model and the benchmark's schema: ~15% of draws)."""
        refused = []
        for i in sorted(rows):
            result = sampled[i]
            if isinstance(result, Exception):
                continue
            if chunks[i].seq.state.matcher.validate_tokens([result[0]]) != 1:
                refused.append(i)
        if not refused:
            return
        job = self._mask_worker().start(refused, [chunks[i].seq.state.matcher for i in refused])
        try:
            job.apply(logits)
        except Exception as exc:  # those rows fail alone, as a sampling error would
            for i in refused:
                sampled[i] = exc
            return
        again = self._sample([chunks[i] for i in refused], logits[refused], {})
        for i, result in zip(refused, again, strict=True):
            sampled[i] = result

    def _sample(
        self, chunks: list[ScheduledChunk], logits: Tensor, failed: dict[int, Exception]
    ) -> list[Sampled]:
        """One token (and its logprobs) per chunk, or the exception its request hit."""
        rows: list[SamplingRow | Exception] = []
        for i, chunk in enumerate(chunks):
            if i in failed:
                rows.append(failed[i])
                continue
            try:
                rows.append(sampling_row(chunk.seq))
            except Exception as exc:
                rows.append(exc)
        return sample_rows(rows, logits, self.model_config.vocab_size)

    def _take_prompt_logprobs(
        self, chunks: list[ScheduledChunk], prompt_rows: list[list[int]], logits: Tensor
    ) -> Tensor:
        """Record the prompt logprobs in ``logits`` (laid out as ``ModelRunner.forward``
        says); return the rows that sample. Costs only the asking requests' own rows."""
        sample_rows_at: list[int] = []
        offset = 0
        for chunk, rows in zip(chunks, prompt_rows, strict=True):
            if rows:
                try:
                    self._record_prompt_logprobs(chunk, rows, logits[offset : offset + len(rows)])
                except Exception as exc:
                    self._fail(chunk.seq, exc)
                offset += len(rows)
            if chunk.produces_token:
                sample_rows_at.append(offset)
                offset += 1
        return logits[sample_rows_at]

    def _record_prompt_logprobs(self, chunk: ScheduledChunk, rows: list[int], part: Tensor) -> None:
        seq = chunk.seq
        st: RequestState = seq.state
        x = part.float()
        targets = [seq.token_ids[chunk.start + r + 1] for r in rows]
        target = torch.tensor(targets, dtype=torch.int64, device=x.device)[:, None]
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        chosen = x.gather(1, target)
        values = (chosen - lse).squeeze(1).tolist()
        ranks = ((x > chosen).sum(dim=-1) + 1).tolist()
        n = st.params.prompt_logprobs or 0
        top_ids: list[list[int]] = [[] for _ in rows]
        top_lps: list[list[float]] = [[] for _ in rows]
        if n:
            top_vals, top = x.topk(min(n, x.shape[-1]), dim=-1)
            top_ids, top_lps = top.tolist(), (top_vals - lse).tolist()
        for i, token in enumerate(targets):
            top_pairs = list(zip(top_ids[i], top_lps[i], strict=True))
            st.prompt_logprobs.append(TokenLogprob(token, values[i], top_pairs, rank=ranks[i]))
        seq.num_prompt_logprobs = chunk.start + rows[-1] + 1

    # update ----------------------------------------------------------------------------

    def _advance(self, step: Step) -> None:
        """The step's chunks are in the KV cache: the scheduler moves its sequences on."""
        with self._cond:
            self.scheduler.update(step)

    # emit ----------------------------------------------------------------------------

    def _emit(self, chunks: list[ScheduledChunk], sampled: list[Sampled]) -> None:
        """Each sampled token becomes its request's next event; finished requests end."""
        now = time.perf_counter()
        for chunk, result in zip(chunks, sampled, strict=True):
            seq = chunk.seq
            if seq.status != SeqStatus.RUNNING:
                continue
            if isinstance(result, Exception):
                self._fail(seq, result)
                continue
            token, logprob = result
            try:
                event = next_event(seq, token, logprob, self.max_model_len, self._eos_ids)
            except Exception as exc:
                self._fail(seq, exc)
                continue
            st: RequestState = seq.state
            if seq.prompt_logprobs and not st.prompt_logprobs_sent:
                event.prompt_logprobs = [None, *st.prompt_logprobs]
                st.prompt_logprobs_sent = True
            self._observe_token(st, now)
            self._send(seq, event)
            if event.finish_reason is not None:
                self._finish(seq, event.finish_reason, now)

    def _observe_token(self, st: RequestState, now: float) -> None:
        m = self.metrics
        m.generation_tokens.inc()
        if st.first_token is None:
            st.first_token = now
            m.ttft.observe(now - st.arrival)
            m.prefill_time.observe(now - (st.first_scheduled or st.arrival))
        elif st.last_token is not None:
            m.itl.observe(now - st.last_token)
        st.last_token = now

    def _finish(self, seq: Seq, reason: FinishReason | str, now: float) -> None:
        with self._cond:
            self.scheduler.finish(seq)
            self._seqs.pop(seq.request_id, None)
        st: RequestState = seq.state
        self.metrics.finished(reason)
        self.metrics.e2e.observe(now - st.arrival)
        if st.first_token is not None:
            self.metrics.decode_time.observe(now - st.first_token)

    def _fail(self, seq: Seq, exc: Exception) -> None:
        logger.error("request %s failed", seq.request_id, exc_info=exc)
        self._send(seq, RequestFailed(f"request {seq.request_id} failed: internal error"))
        self._finish(seq, "error", time.perf_counter())

    def _abort_seq(self, seq: Seq) -> None:
        event = GenerateEvent(seq.request_id, [], "", finish_reason="abort", usage=usage(seq))
        self._send(seq, event)
        self._finish(seq, "abort", time.perf_counter())

    def _apply_aborts(self) -> None:
        with self._cond:
            ids, self._aborts = self._aborts, set()
        for request_id in ids:
            seq = self._seqs.get(request_id)
            if seq is not None:
                self._abort_seq(seq)

    def _send(self, seq: Seq, item: Any) -> None:
        st: RequestState = seq.state
        self._outbox.setdefault(st.loop, []).append((st.queue, item))

    def _flush_outbox(self) -> None:
        """One wake-up per event loop per step, not one per token."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                logger.warning("dropping %d events for a closed event loop", len(items))

    def _update_gauges(self) -> None:
        self.metrics.running.set(self.num_running)
        self.metrics.waiting.set(self.num_waiting)
        self.metrics.kv_cache_usage.set(self.kv_cache_usage)

    # embeddings ------------------------------------------------------------------------

    def _run_embeds(self) -> None:
        """Embedding inputs up to one step's token budget."""
        budget = self.config.max_batched_tokens
        while budget > 0:
            with self._cond:
                if not self._embeds:
                    return
                job = self._embeds[0]
            take = job.next_inputs(budget)
            budget -= sum(len(t) for t in take)
            job.results.extend(self.runner.embed(take, job.pooling, job.normalize))
            if job.done:
                with self._cond:
                    self._embeds.popleft()
                job.resolve(job.results)

    # shutdown and death ----------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop requested: end what is left with ``abort``, refuse pending embeddings."""
        for seq in list(self._seqs.values()):
            self._abort_seq(seq)
        with self._cond:
            jobs, self._embeds = list(self._embeds), deque()
        for job in jobs:
            job.resolve(EngineUnavailable("the engine stopped"))
        self._flush_outbox()
        self._update_gauges()
        self.grammars.close()
        if self._masks is not None:
            self._masks.close()

    def _die(self, exc: BaseException) -> None:
        logger.critical("the engine loop died", exc_info=exc)
        with self._cond:
            self._dead = exc
            self._state = "dead"
            seqs, self._seqs = list(self._seqs.values()), {}
            jobs, self._embeds = list(self._embeds), deque()
        message = f"the engine loop died: {exc!r}"
        for seq in seqs:
            self._send(seq, EngineDead(message))
        for job in jobs:
            job.resolve(EngineDead(message))
        self._flush_outbox()
