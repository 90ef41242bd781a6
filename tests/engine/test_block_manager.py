"""Block pool accounting and the prefix cache's keys, sharing and LRU eviction."""

from __future__ import annotations

import pytest

from service.engine.block_manager import BlockManager, NoFreeBlocks, block_key


def test_allocate_and_free_restore_the_pool() -> None:
    bm = BlockManager(8, 4)
    bm.match_prefix("a", list(range(10)))
    bm.allocate("a", 10)
    assert len(bm.tables["a"].blocks) == 3 and bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    with pytest.raises(NoFreeBlocks):
        bm.match_prefix("b", [1])
        bm.allocate("b", 100)
    assert bm.num_free_blocks == 5  # a failed allocation takes nothing
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_keys_chain_the_whole_prefix() -> None:
    a = block_key(block_key(b"", [1, 2]), [3, 4])
    b = block_key(block_key(b"", [9, 9]), [3, 4])
    assert a != b  # same block tokens, different prefix
    assert block_key(b"", [1, 2]) == block_key(b"", [1, 2])


def test_shared_prefix_is_reused_and_reference_counted() -> None:
    bm = BlockManager(16, 4)
    tokens = list(range(13))
    bm.match_prefix("a", tokens)
    bm.allocate("a", 13)
    bm.commit("a", tokens, 13)  # 3 full blocks published
    assert bm.match_prefix("b", tokens) == 12
    assert bm.tables["b"].blocks == bm.tables["a"].blocks[:3]
    bm.free("a")
    assert bm.usage > 0  # b still holds the shared blocks
    bm.free("b")
    assert bm.num_free_blocks == 16 and bm.usage == 0.0
    # Unreferenced but still cached: a third sequence hits them.
    assert bm.match_prefix("c", tokens + [99]) == 12
    bm.free("c")


def test_last_token_is_never_matched() -> None:
    bm = BlockManager(8, 4)
    tokens = list(range(8))
    bm.match_prefix("a", tokens)
    bm.allocate("a", 8)
    bm.commit("a", tokens, 8)
    bm.free("a")
    assert bm.match_prefix("b", tokens) == 4  # 8 tokens: the second block holds the last one
    bm.free("b")


def test_lru_eviction_prefers_the_least_recently_freed() -> None:
    bm = BlockManager(4, 2)
    for name, first in (("old", 0), ("new", 100)):
        toks = [first, first + 1, first + 2]
        bm.match_prefix(name, toks)
        bm.allocate(name, 3)
        bm.commit(name, toks, 2)
        bm.free(name)
    assert bm.num_free_blocks == 4
    bm.match_prefix("x", [7])
    bm.allocate("x", 3)  # two blocks: the two plain free ones
    bm.match_prefix("y", [8])
    bm.allocate("y", 1)  # must evict a cached block: the older one goes
    assert bm.match_prefix("z", [100, 101, 102]) == 2
    assert bm.match_prefix("w", [0, 1, 2]) == 0
    for s in ("x", "y", "z", "w"):
        bm.free(s)
    assert bm.num_free_blocks == 4


def test_caching_off_matches_nothing() -> None:
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    bm.match_prefix("a", [1, 2, 3])
    bm.allocate("a", 3)
    bm.commit("a", [1, 2, 3], 3)
    bm.free("a")
    assert bm.match_prefix("b", [1, 2, 3]) == 0
    bm.free("b")
