"""KV block pool, per-sequence block tables and the prefix cache.

A block holds ``block_size`` consecutive tokens of one sequence. Once a block is
full and computed it may be shared: its key chains the parent block's key with
its own token ids (so equal keys mean equal whole prefixes), and a later
sequence whose prompt starts with the same tokens reuses it instead of
recomputing it. Blocks are reference counted; a cached block nobody references
stays cached but counts as free, and is evicted least-recently-used when the
pool needs room.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT_KEY = b""


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Collision-resistant key of a full block given its parent's key."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class BlockTable:
    """The blocks of one sequence, and the keys of its leading full blocks."""

    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # keys[i] is the key of blocks[i]


class NoFreeBlocks(RuntimeError):
    """The pool cannot provide the blocks asked for (the scheduler preempts)."""


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive ({num_blocks}, {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        # Blocks with no cached content, as a min-heap: the lowest ids are reused first,
        # so the part of the cache ever written (and resident in memory) stays compact.
        self._free: list[int] = list(range(num_blocks))
        self._evictable: OrderedDict[bytes, int] = OrderedDict()  # cached, unreferenced; LRU first
        self._cached: dict[bytes, int] = {}  # every cached block, referenced or not
        self.tables: dict[str, BlockTable] = {}

    # -- accounting ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence could get now (evictable cached blocks included)."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Share of the pool held by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra blocks ``seq_id`` needs to hold ``num_tokens`` tokens."""
        have = len(self.tables[seq_id].blocks) if seq_id in self.tables else 0
        return max(0, -(-num_tokens // self.block_size) - have)

    # -- lifecycle ----------------------------------------------------------------

    def match_prefix(self, seq_id: str, token_ids: Sequence[int], use_cache: bool = True) -> int:
        """Open a table for ``seq_id`` holding the cached full blocks its tokens start
        with; returns how many tokens they cover. The last token is never matched, so
        at least one token is left to compute (it yields the next-token logits).
        ``use_cache=False`` opens an empty table (every token is computed)."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        table = self.tables[seq_id] = BlockTable()
        if not self.enable_prefix_caching or not use_cache:
            return 0
        parent = ROOT_KEY
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            key = block_key(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._cached.get(key)
            if block is None:
                break
            self._take(block)
            table.blocks.append(block)
            table.keys.append(key)
            parent = key
        return len(table.blocks) * bs

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens, or raise NoFreeBlocks
        (taking nothing)."""
        table = self.tables[seq_id]
        need = self.blocks_needed(seq_id, num_tokens)
        if need > self.num_free_blocks:
            raise NoFreeBlocks(f"need {need} blocks, {self.num_free_blocks} free")
        for _ in range(need):
            table.blocks.append(self._pop_free())

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Publish the full blocks among the first ``num_computed`` tokens to the cache."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        bs = self.block_size
        for i in range(len(table.keys), num_computed // bs):
            parent = table.keys[-1] if table.keys else ROOT_KEY
            key = block_key(parent, token_ids[i * bs : (i + 1) * bs])
            table.keys.append(key)
            block = table.blocks[i]
            # The same prefix computed twice at once: keep the first copy cached;
            # this one stays private and returns to the plain free list.
            if key not in self._cached:
                self._cached[key] = block
                self._key[block] = key

    def free(self, seq_id: str) -> None:
        """Release every block of ``seq_id`` (no-op if it holds none)."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            return
        # Tail blocks first: they become the least recently used, evicted before
        # the shared head of the prefix.
        for block in reversed(table.blocks):
            self._ref[block] -= 1
            if self._ref[block] > 0:
                continue
            key = self._key[block]
            if key is None:
                heapq.heappush(self._free, block)
            else:
                self._evictable[key] = block

    # -- internals ----------------------------------------------------------------

    def _take(self, block: int) -> None:
        if self._ref[block] == 0:
            key = self._key[block]
            if key is not None:
                self._evictable.pop(key, None)
        self._ref[block] += 1

    def _pop_free(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        else:
            key, block = self._evictable.popitem(last=False)
            del self._cached[key]
            self._key[block] = None
        self._ref[block] = 1
        return block
