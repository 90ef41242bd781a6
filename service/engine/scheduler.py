"""The scheduler: who computes which tokens in the next step.

Contract
--------
* ``waiting`` is a FIFO queue bounded by ``max_queue_requests`` requests and
  ``max_queue_tokens`` tokens; ``add`` raises ``QueueFull`` beyond either.
* ``running`` (admission order) holds at most ``max_num_seqs`` sequences, each
  holding KV blocks for every token it has computed.
* ``schedule`` returns chunks ``[num_computed, num_computed + n)`` of token ids
  to compute, at most ``max_batched_tokens`` in all: first one token for every
  running sequence that is decoding, then chunks of running sequences whose
  prompt is partly computed (chunked prefill), then chunks of waiting
  sequences, admitted FIFO while the budget, ``max_num_seqs`` and free blocks
  allow. A long prompt therefore delays running streams by one chunk at most.
* Admission reuses prefix-cached blocks: those tokens are not recomputed, but
  the last token always is (its logits give the next token). A sequence that
  wants its prompt's logprobs and has not got them all yet skips the cache: its
  prompt is computed whole (its own tokens only), and those logits give them.
* When a running sequence needs a block and none is free, the most recently
  admitted running sequence is preempted: its blocks are freed, it goes back to
  the front of the waiting queue and later recomputes its prompt and generated
  tokens, which yields exactly the same continuation. No admission happens in
  a step that preempted.
* ``update`` advances the sequences once the step ran; ``finish`` frees a
  sequence, ``abort`` removes one wherever it is.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.engine.block_manager import BlockManager, NoFreeBlocks
from service.engine.config import EngineConfig
from service.engine.types import QueueFull

if TYPE_CHECKING:
    from service.engine.request import RequestState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Seq:
    """Scheduling state of one request: its tokens and how many are in the cache.

    ``token_ids`` is the prompt followed by the generated tokens; the engine keeps
    its per-request state (detokenizer, sink, timings) in ``state``.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int
    num_computed: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    state: RequestState = field(kw_only=True)  # the engine's per-request state
    prompt_logprobs: bool = False  # the logprobs of its prompt tokens are wanted
    num_prompt_logprobs: int = 0  # positions whose next-token logprobs were taken

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions remain whose logits (for the next prompt token) are wanted."""
        return self.prompt_logprobs and self.num_prompt_logprobs < self.num_prompt_tokens - 1

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class ScheduledChunk:
    seq: Seq
    start: int  # first position computed in this step
    length: int

    @property
    def produces_token(self) -> bool:
        """The chunk reaches the end of the known tokens: its logits give a new token."""
        return self.start + self.length == len(self.seq.token_ids)

    @property
    def prompt_rows(self) -> list[int]:
        """Offsets in the chunk whose logits give a prompt token's logprob (the token after
        them is a prompt token), for a sequence that wants them and lacks them."""
        seq = self.seq
        if not seq.needs_prompt_logprobs:
            return []
        first = max(self.start, seq.num_prompt_logprobs)
        last = min(self.start + self.length, seq.num_prompt_tokens - 1)
        return [p - self.start for p in range(first, last)]


@dataclass
class Step:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Seq] = field(default_factory=list)
    admitted: list[Seq] = field(default_factory=list)
    prefix_queries: int = 0  # tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.waiting_tokens = 0

    # -- queue ----------------------------------------------------------------------

    def add(self, seq: Seq) -> None:
        cfg = self.config
        if len(self.waiting) >= cfg.max_queue_requests:
            raise QueueFull(
                f"the queue holds {len(self.waiting)} requests, its limit", retry_after=1.0
            )
        if self.waiting_tokens + len(seq.token_ids) > cfg.max_queue_tokens:
            raise QueueFull(
                f"the queue holds {self.waiting_tokens} prompt tokens; {len(seq.token_ids)} more "
                f"would pass its limit of {cfg.max_queue_tokens}",
                retry_after=1.0,
            )
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self.waiting_tokens += len(seq.token_ids)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ---------------------------------------------------------------------

    def schedule(self) -> Step:
        step = Step()
        budget = self.config.max_batched_tokens
        decodes = [s for s in self.running if s.num_uncomputed == 1]
        prefills = [s for s in self.running if s.num_uncomputed > 1]
        wanted: dict[Seq, int] = {s: 1 for s in decodes}
        budget -= len(decodes)
        for seq in prefills:
            n = min(seq.num_uncomputed, budget)
            if n > 0:
                wanted[seq] = n
                budget -= n
        for seq in list(self.running):  # admission order: victims come from the tail
            if seq.status != SeqStatus.RUNNING or seq not in wanted:
                continue
            if self._reserve(seq, wanted[seq], step):
                step.chunks.append(ScheduledChunk(seq, seq.num_computed, wanted[seq]))
        # Decodes first in the batch, as promised (they were reserved in admission order).
        step.chunks.sort(key=lambda c: not (c.length == 1 and c.produces_token))
        # Without preemption every wanted chunk was scheduled: ``budget`` is what is left.
        if not step.preempted:
            self._admit(step, budget)
        return step

    def _reserve(self, seq: Seq, n: int, step: Step) -> bool:
        """Blocks for ``n`` more tokens of ``seq``, preempting from the tail if needed.
        False when ``seq`` itself had to be preempted."""
        while True:
            try:
                self.blocks.allocate(seq.request_id, seq.num_computed + n)
                return True
            except NoFreeBlocks:
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    return False

    def _preempt(self, seq: Seq, step: Step) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.waiting_tokens += len(seq.token_ids)
        step.preempted.append(seq)

    def _admit(self, step: Step, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(
                seq.request_id, seq.token_ids, use_cache=not seq.needs_prompt_logprobs
            )
            n = min(len(seq.token_ids) - cached, budget)
            try:
                self.blocks.allocate(seq.request_id, cached + n)
            except NoFreeBlocks:
                self.blocks.free(seq.request_id)  # give back the matched prefix
                return
            self.waiting.popleft()
            self.waiting_tokens -= len(seq.token_ids)
            step.prefix_queries += len(seq.token_ids)
            step.prefix_hits += cached
            if seq.num_preemptions == 0:  # first admission (only preemption sends one back)
                seq.num_cached_tokens = cached
            seq.num_computed = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            step.admitted.append(seq)
            step.chunks.append(ScheduledChunk(seq, cached, n))
            budget -= n

    # -- after the step -----------------------------------------------------------------

    def update(self, step: Step) -> None:
        """The step's chunks are in the cache: advance and publish full blocks."""
        for chunk in step.chunks:
            seq = chunk.seq
            if seq.status != SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed = chunk.start + chunk.length
            self.blocks.commit(seq.request_id, seq.token_ids, seq.num_computed)

    def finish(self, seq: Seq) -> None:
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
            self.waiting_tokens -= len(seq.token_ids)
        seq.status = SeqStatus.FINISHED
        self.blocks.free(seq.request_id)
