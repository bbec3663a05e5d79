"""BlockPool: reference counts, the hash index and the free lists stay consistent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.kv.block_pool import BlockPool, NoFreeBlocksError
from kvtier.kv.hashing import hash_block_tokens, root_block_hash
from kvtier.types import BlockHash

ROOT = root_block_hash("test-model", "float32")


def h(i: int) -> BlockHash:
    return hash_block_tokens(ROOT, [i])


class RecordingListener:
    def __init__(self) -> None:
        self.evicted: list[tuple[BlockHash, int]] = []
        self.reused: list[bool] = []

    def on_evict(self, evicted: list[tuple[BlockHash, int]], reused: bool = True) -> None:
        self.evicted.extend(evicted)
        self.reused.append(reused)


def test_allocate_prefers_clean_blocks_then_evicts_least_recently_freed() -> None:
    listener = RecordingListener()
    pool = BlockPool(4, eviction_listener=listener)
    a, b, c, d = pool.allocate(4)
    for block, key in ((a, 1), (b, 2), (c, 3)):
        pool.cache_block(block, h(key))
    pool.free([c, b, a])  # c freed first: least recently used
    pool.free([d])  # d has no hash: clean
    assert pool.allocate(1) == [d]
    assert pool.allocate(1) == [c]
    assert listener.evicted == [(h(3), c)]
    assert listener.reused == [True]
    assert pool.get_cached_block(h(3)) is None and pool.get_cached_block(h(2)) == b
    pool.check_integrity()


def test_a_reset_tells_the_listener_its_blocks_are_dropped_not_reused() -> None:
    # The tier manager stores candidates it is told are being reused (their new owner is
    # about to write them); a reset only forgets hashes, so nothing is copied down.
    listener = RecordingListener()
    pool = BlockPool(3, eviction_listener=listener)
    blocks = pool.allocate(2)
    for key, block in enumerate(blocks):
        pool.cache_block(block, h(key))
    pool.free(blocks)
    assert pool.reset_prefix_cache() == 2
    assert sorted(listener.evicted) == sorted((h(k), b) for k, b in enumerate(blocks))
    assert listener.reused == [False]
    pool.check_integrity()


def test_next_evictions_names_no_block_while_clean_blocks_last() -> None:
    # Lazy tier stores copy down the blocks that the next allocations evict; allocation
    # takes never-used (clean) blocks first, so those stores start only under pressure.
    pool = BlockPool(6)
    blocks = pool.allocate(6)
    for i, block in enumerate(blocks[:4]):
        pool.cache_block(block, h(i))
    pool.free(blocks[:4])  # cached, evicted in this order
    pool.free(blocks[4:])  # clean
    assert pool.next_evictions(2) == []
    assert pool.next_evictions(3) == [h(0)]
    assert pool.next_evictions(5) == [h(0), h(1), h(2)]
    assert pool.next_evictions(9) == [h(0), h(1), h(2), h(3)]
    # Only those among the tier's candidates, in the same order.
    assert pool.next_evictions(9, among={h(3), h(1)}) == [h(1), h(3)]
    assert pool.next_evictions(4, among={h(3), h(1)}) == [h(1)]


def test_touch_revives_a_freed_cached_block() -> None:
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.cache_block(a, h(7))
    pool.free([a])
    assert pool.num_free_blocks == 2
    pool.touch([pool.get_cached_block(h(7))])
    assert pool.num_free_blocks == 1 and pool.blocks[a].ref_cnt == 1
    pool.check_integrity()


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.check_integrity()


def test_duplicate_hash_is_not_registered_twice() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, h(5))
    assert not pool.cache_block(b, h(5))
    pool.free([a, b])
    assert pool.get_cached_block(h(5)) == a
    pool.check_integrity()


def test_double_free_is_an_error() -> None:
    pool = BlockPool(1)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(ValueError):
        pool.free([a])


def test_caching_disabled_registers_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    assert not pool.cache_block(a, h(1))
    assert pool.get_cached_block(h(1)) is None


class BlockPoolMachine(RuleBasedStateMachine):
    """Random allocate / cache / touch / free / evict sequences against a shadow model."""

    def __init__(self) -> None:
        super().__init__()
        self.listener = RecordingListener()
        self.pool = BlockPool(8, eviction_listener=self.listener)
        self.refs: dict[int, int] = {}  # shadow reference counts of blocks we hold
        self.next_key = 0

    @rule(n=st.integers(1, 4))
    def allocate(self, n: int) -> None:
        free_before = self.pool.num_free_blocks
        if n > free_before:
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            assert self.pool.num_free_blocks == free_before
            return
        evicted_before = len(self.listener.evicted)
        predicted = self.pool.next_evictions(n)  # what lazy tier stores copy down first
        for block in self.pool.allocate(n):
            assert self.refs.get(block, 0) == 0
            self.refs[block] = 1
        for _, block in self.listener.evicted[evicted_before:]:
            assert self.pool.blocks[block].block_hash is None
        evicted = [block_hash for block_hash, _ in self.listener.evicted[evicted_before:]]
        assert evicted == predicted

    @precondition(lambda self: any(self.refs.values()))
    @rule(data=st.data())
    def cache(self, data: st.DataObject) -> None:
        block = data.draw(st.sampled_from(sorted(b for b, r in self.refs.items() if r)))
        self.next_key += 1
        self.pool.cache_block(block, h(self.next_key))

    @precondition(lambda self: any(self.refs.values()))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        block = data.draw(st.sampled_from(sorted(b for b, r in self.refs.items() if r)))
        self.pool.free([block])
        self.refs[block] -= 1

    @rule(data=st.data())
    def touch_cached(self, data: st.DataObject) -> None:
        cached = [b.block_id for b in self.pool.blocks if b.block_hash is not None]
        if not cached:
            return
        block = data.draw(st.sampled_from(cached))
        self.pool.touch([block])
        self.refs[block] = self.refs.get(block, 0) + 1

    @invariant()
    def consistent(self) -> None:
        self.pool.check_integrity()
        for block, refs in self.refs.items():
            assert self.pool.blocks[block].ref_cnt == refs
        assert self.pool.num_free_blocks == sum(1 for b in self.pool.blocks if b.ref_cnt == 0)


TestBlockPoolMachine = BlockPoolMachine.TestCase
TestBlockPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(0, 50_000), min_size=0, max_size=64), st.integers(1, 16))
def test_chained_hashes_depend_on_the_whole_prefix(tokens: list[int], block_size: int) -> None:
    from kvtier.kv.hashing import hash_request_blocks
    hashes = hash_request_blocks(ROOT, tokens, block_size, [])
    assert len(hashes) == len(tokens) // block_size
    if hashes:
        changed = [tokens[0] + 1] + tokens[1:]
        other = hash_request_blocks(ROOT, changed, block_size, [])
        assert all(a != b for a, b in zip(hashes, other, strict=True))
    # Memoised extension equals a fresh computation.
    partial = hash_request_blocks(ROOT, tokens[: len(tokens) // 2], block_size, [])
    assert hash_request_blocks(ROOT, tokens, block_size, partial) == hashes
