"""TierManager's lazy stores: what the next allocations evict is copied down, in one gather."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kvtier.config import TierConfig
from kvtier.kv.block_pool import BlockPool
from kvtier.kv.hashing import hash_block_tokens, root_block_hash
from kvtier.tiers import manager as manager_module
from kvtier.tiers.base import EntryMeta, KVLayout
from kvtier.tiers.cost import CostModel, TierRate
from kvtier.tiers.cpu import CPUStore
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.manager import TierManager
from kvtier.tiers.policy import create_policy
from kvtier.tiers.transfer import GatheredBlocks, KVTransfer, LoadPart

LAYOUT = KVLayout("test-model", "float32", num_layers=2, num_kv_heads=1, head_dim=4,
                  block_size=2, dtype_bytes=4)
NUM_BLOCKS = 16
CHUNK_BLOCKS = 2


class CountingTransfer(KVTransfer):
    def __init__(self, kv_cache: torch.Tensor) -> None:
        super().__init__(kv_cache)
        self.gathers: list[list[list[int]]] = []

    def gather(self, chunks: list[list[int]]) -> list[GatheredBlocks]:
        self.gathers.append(chunks)
        return super().gather(chunks)


def make_manager(min_hits: int | str = "auto",
                 ) -> tuple[TierManager, BlockPool, CountingTransfer, CPUStore]:
    kv_cache = torch.randn(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    pool = BlockPool(NUM_BLOCKS, enable_caching=True)
    store = CPUStore(LAYOUT, 8 * CHUNK_BLOCKS * LAYOUT.block_bytes, create_policy("lru"),
                     CHUNK_BLOCKS, pin_memory=False)
    transfer = CountingTransfer(kv_cache)
    # Loads always pay: recomputing runs at 1 token/s, the tier at 1 GB/s.
    cost = CostModel(1.0, {"cpu": TierRate(1e9, latency_s=0.0)})
    config = TierConfig(kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size,
                        kv_store_min_hits=min_hits)
    manager = TierManager(config, [store], transfer, pool, LAYOUT.block_size, cost)
    pool.eviction_listener = manager
    return manager, pool, transfer, store


def prefix_hashes(seed: int, num_blocks: int) -> list[bytes]:
    """The chained hashes of a `num_blocks`-block prefix, one per seed."""
    hashes, parent = [], root_block_hash("test-model")
    for i in range(num_blocks):
        parent = hash_block_tokens(parent, [seed, i])
        hashes.append(parent)
    return hashes


def cached_prefix(pool: BlockPool, seed: int, num_blocks: int) -> tuple[list[bytes], list[int]]:
    """A request's computed prefix: blocks allocated and cached under prefix_hashes."""
    blocks = pool.allocate(num_blocks)
    hashes = prefix_hashes(seed, num_blocks)
    for block, block_hash in zip(blocks, hashes, strict=True):
        pool.cache_block(block, block_hash)
    return hashes, blocks


def finished_prefix(pool: BlockPool, manager: TierManager, seed: int,
                    num_blocks: int) -> tuple[list[bytes], list[int]]:
    """A request's computed, cached blocks, then freed (they become lazy candidates)."""
    hashes, blocks = cached_prefix(pool, seed, num_blocks)
    manager.note_request(hashes)
    manager.on_request_freed(hashes, num_blocks)
    pool.free(list(reversed(blocks)))
    return hashes, blocks


def test_lookahead_stores_every_chunk_the_next_allocations_evict_in_one_gather() -> None:
    manager, pool, transfer, store = make_manager()
    hashes, blocks = finished_prefix(pool, manager, seed=1, num_blocks=8)
    # 8 clean blocks remain: allocating 8 evicts nothing, so nothing is copied yet.
    manager.store_lookahead(8)
    assert transfer.gathers == []
    # Allocating 12 would evict 4 cached blocks, the prefix's last two chunks (freed
    # last-first): both go down in one gather.
    manager.store_lookahead(12)
    manager.wait_idle()
    manager.poll()
    assert len(transfer.gathers) == 1 and len(transfer.gathers[0]) == 2
    assert sorted(b for chunk in transfer.gathers[0] for b in chunk) == sorted(blocks[4:])
    assert [store.has_block(h) for h in hashes] == [False] * 4 + [True] * 4
    # The stored bytes are the blocks' KV, entry by entry.
    for first in (4, 6):
        found = store.locate(hashes[first])
        assert found is not None
        meta, _ = found
        stored = transfer.entry_view(store.read(meta), CHUNK_BLOCKS)
        expected = transfer.kv_cache[:, :, blocks[first:first + CHUNK_BLOCKS]]
        assert torch.equal(stored, expected)
    pool.check_integrity()
    manager.close()


def test_a_store_leaves_its_blocks_free_to_be_reused_at_once() -> None:
    # The gather captures the blocks when the store starts: the lookahead picks exactly the
    # blocks the next allocations evict, so holding them until the copy ended (as the CPU
    # path once did) kept admission from them for a step or more.
    manager, pool, transfer, store = make_manager()
    hashes, blocks = finished_prefix(pool, manager, seed=1, num_blocks=8)
    expected = transfer.kv_cache[:, :, blocks[4:]].clone()
    manager.store_lookahead(12)  # the prefix's last two chunks are the next evictions
    assert pool.num_free_blocks == NUM_BLOCKS
    reused = pool.allocate(12)  # evicts those four blocks before the copies finish
    assert set(blocks[4:]) <= set(reused)
    transfer.kv_cache[:, :, reused] = -1.0  # their new owners' KV
    manager.wait_idle()
    manager.poll()
    for first in (4, 6):
        found = store.locate(hashes[first])
        assert found is not None
        stored = transfer.entry_view(store.read(found[0]), CHUNK_BLOCKS)
        assert torch.equal(stored, expected[:, :, first - 4:first - 4 + CHUNK_BLOCKS])
    pool.free(reused)
    pool.check_integrity()
    manager.close()


def test_a_load_of_many_parts_lands_every_block_where_the_index_says() -> None:
    # copy_in_parts stages every part of a load in one buffer and scatters them in groups:
    # parts that start mid-entry and end early, more parts than a group, blocks in any order.
    kv_cache = torch.zeros(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    transfer = KVTransfer(kv_cache)
    entry_blocks = 3
    shape = (LAYOUT.num_layers, 2, entry_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads,
             LAYOUT.head_dim)
    entries = [torch.randn(shape) for _ in range(6)]
    spans = [(0, 3), (1, 2), (0, 1), (2, 1), (0, 3), (1, 1)]  # (first, count) per entry
    parts = [LoadPart(entry.view(-1).view(torch.uint8), entry_blocks, first, count)
             for entry, (first, count) in zip(entries, spans, strict=True)]
    destinations = torch.randperm(NUM_BLOCKS)[:sum(c for _, c in spans)].tolist()
    transfer.copy_in_parts(parts, transfer.load_index(destinations))
    expected = torch.cat([entry[:, :, first:first + count]
                          for entry, (first, count) in zip(entries, spans, strict=True)], dim=2)
    assert torch.equal(kv_cache[:, :, destinations], expected)
    untouched = sorted(set(range(NUM_BLOCKS)) - set(destinations))
    assert not kv_cache[:, :, untouched].any()


def test_candidates_the_lookahead_missed_are_stored_as_they_are_evicted() -> None:
    # A step that allocates more than the lookahead saw (several misses and loads admitted
    # together) evicts candidates nobody copied: they go down at eviction, with the data
    # they held then, before their new owner's forward pass overwrites the blocks.
    manager, pool, transfer, store = make_manager()
    hashes, blocks = finished_prefix(pool, manager, seed=2, num_blocks=8)
    original = transfer.kv_cache[:, :, blocks].clone()
    taken = pool.allocate(12)  # no lookahead: evicts the prefix's last 4 blocks
    transfer.kv_cache[:, :, taken] = -1.0  # the new owner writes its blocks
    manager.wait_idle()
    manager.poll()
    assert manager.stats.num_stores_at_eviction == 2
    assert manager.stats.num_evicted_unsaved_blocks == 0
    assert [store.has_block(h) for h in hashes] == [False] * 4 + [True] * 4
    for first in (4, 6):
        found = store.locate(hashes[first])
        assert found is not None
        stored = transfer.entry_view(store.read(found[0]), CHUNK_BLOCKS)
        assert torch.equal(stored, original[:, :, first:first + CHUNK_BLOCKS])
    pool.free(taken)
    pool.check_integrity()
    manager.close()


def test_a_prefix_cache_reset_stores_nothing() -> None:
    manager, pool, transfer, store = make_manager()
    finished_prefix(pool, manager, seed=3, num_blocks=8)
    assert pool.reset_prefix_cache() == 8
    manager.wait_idle()
    assert transfer.gathers == [] and manager.stats.num_stores_at_eviction == 0
    assert manager.stats.num_evicted_unsaved_blocks == 8
    manager.close()


def test_a_load_of_whole_chunks_lands_every_block_where_the_index_says() -> None:
    # Whole entries of one size take the grouped scatter (one indexed write per group).
    kv_cache = torch.zeros(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    transfer = KVTransfer(kv_cache)
    shape = (LAYOUT.num_layers, 2, CHUNK_BLOCKS, LAYOUT.block_size, LAYOUT.num_kv_heads,
             LAYOUT.head_dim)
    entries = [torch.randn(shape) for _ in range(7)]  # two groups of 4, the last one short
    parts = [LoadPart(entry.view(-1).view(torch.uint8), CHUNK_BLOCKS, 0, CHUNK_BLOCKS)
             for entry in entries]
    destinations = torch.randperm(NUM_BLOCKS)[:7 * CHUNK_BLOCKS].tolist()
    transfer.copy_in_parts(parts, transfer.load_index(destinations))
    assert torch.equal(kv_cache[:, :, destinations], torch.cat(entries, dim=2))
    untouched = sorted(set(range(NUM_BLOCKS)) - set(destinations))
    assert not kv_cache[:, :, untouched].any()


def test_stores_at_eviction_count_only_chunks_copied_then() -> None:
    """A prefix whose last two chunks the lookahead stored is hit and freed again by a
    second request, so all four chunks are candidates once more. When its blocks are
    evicted, the two chunks not yet in the tier go down in one gather, and the counter says
    2, not 4: the already stored ones are saved, not stored again."""
    manager, pool, transfer, store = make_manager()
    hashes, blocks = finished_prefix(pool, manager, seed=1, num_blocks=8)
    manager.store_lookahead(12)
    manager.wait_idle()
    manager.poll()
    assert [store.has_block(h) for h in hashes] == [False] * 4 + [True] * 4
    pool.touch(blocks)  # a second request hits the whole prefix, then frees it
    manager.note_request(hashes)
    manager.on_request_freed(hashes, 8)
    pool.free(list(reversed(blocks)))
    gathers_before = len(transfer.gathers)
    pool.allocate(16)  # evicts all 8 cached blocks
    manager.wait_idle()
    manager.poll()
    assert [len(g) for g in transfer.gathers[gathers_before:]] == [2]
    assert manager.stats.num_stores_at_eviction == 2
    assert manager.stats.num_evicted_unsaved_blocks == 0
    assert all(store.has_block(h) for h in hashes)
    manager.close()


def test_a_store_at_eviction_without_memory_leaves_the_pool_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gather runs inside the pool's eviction: when it cannot get memory, the eviction
    still completes (the blocks are handed out, their hashes dropped, the pool consistent)
    and the chunks count as evicted unsaved."""
    manager, pool, transfer, store = make_manager()
    hashes, _ = finished_prefix(pool, manager, seed=1, num_blocks=8)

    def out_of_memory(chunks: list[list[int]], now: bool = False) -> list[GatheredBlocks]:
        raise torch.OutOfMemoryError("no room for the gather")

    monkeypatch.setattr(transfer, "gather", out_of_memory)
    taken = pool.allocate(16)  # evicts all 8 cached blocks
    assert len(taken) == 16
    pool.check_integrity()
    assert not any(pool.get_cached_block(h) is not None for h in hashes)
    assert manager.stats.num_stores_at_eviction == 0
    assert manager.stats.num_evicted_unsaved_blocks == 8
    manager.close()


def test_a_tier_judged_too_slow_still_gets_stores_to_measure() -> None:
    """The first tier's estimate says 1 kB/s (a probe that hit a stall), so no store pays.
    Stores are still let through once per retry interval: with nothing stored, nothing would
    ever be loaded and measured, and the tier would stay unused for the whole run."""
    now = [0.0]
    kv_cache = torch.randn(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    pool = BlockPool(NUM_BLOCKS, enable_caching=True)
    store = CPUStore(LAYOUT, 8 * CHUNK_BLOCKS * LAYOUT.block_bytes, create_policy("lru"),
                     CHUNK_BLOCKS, pin_memory=False)
    cost = CostModel(1e6, {"cpu": TierRate(1e3)}, clock=lambda: now[0])
    config = TierConfig(kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size,
                        kv_store_policy="write-through")
    manager = TierManager(config, [store], KVTransfer(kv_cache), pool, LAYOUT.block_size, cost)
    pool.eviction_listener = manager
    for seed in range(20):  # a request every 5 s
        now[0] += 5.0
        hashes, blocks = cached_prefix(pool, seed, 4)
        manager.note_request(hashes)
        manager.on_blocks_computed(hashes, 4, 0)
        manager.on_request_freed(hashes, 4)
        manager.wait_idle()
        manager.poll()
        pool.free(list(reversed(blocks)))
    assert store.num_entries > 0
    manager.close()


def test_write_down_copies_what_the_lower_tier_lacks_oldest_first(tmp_path: Path) -> None:
    """cpu over a disk that holds two entries: write_down copies the cpu entries the disk
    lacks, skips the one it has, and when the disk is full the newest ones are kept."""
    kv_cache = torch.zeros(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    cpu = CPUStore(LAYOUT, 8 * CHUNK_BLOCKS * LAYOUT.block_bytes, create_policy("lru"),
                   CHUNK_BLOCKS, pin_memory=False)
    probe = DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(tmp_path / "probe"))
    metas = [EntryMeta(hashes[-1], tuple(hashes), CHUNK_BLOCKS * LAYOUT.block_bytes)
             for hashes in (prefix_hashes(seed, CHUNK_BLOCKS) for seed in range(4))]
    per_entry = probe._entry_bytes(metas[0])
    disk = DiskStore(LAYOUT, 3 * per_entry, create_policy("lru"), str(tmp_path / "disk"))
    for store, meta in [(cpu, m) for m in metas] + [(disk, metas[0])]:
        handle = store.prepare_store(meta)
        assert handle is not None
        handle.buffer.fill_(metas.index(meta) + 1)
        store.complete_store(handle, True)
    cost = CostModel(1.0, {"cpu": TierRate(1e9), "disk": TierRate(1e9)})
    manager = TierManager(TierConfig(kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size),
                          [cpu, disk], KVTransfer(kv_cache), BlockPool(NUM_BLOCKS),
                          LAYOUT.block_size, cost)
    assert manager.write_down() == 3
    assert [disk.has(m.key) for m in metas] == [False, True, True, True]
    assert int(disk.read(metas[3])[0]) == 4
    assert cpu.stats.num_loaded_bytes == 0  # copying down is not a load
    disk.check_integrity()
    manager.close()


def stored_after_eviction(manager: TierManager, pool: BlockPool, seed: int) -> list[bool]:
    """Finish a request over an 8-block prefix (seed), evict the whole pool with the
    lookahead on, and say which of its blocks the tier holds."""
    hashes, _ = finished_prefix(pool, manager, seed=seed, num_blocks=8)
    manager.store_lookahead(NUM_BLOCKS)
    manager.wait_idle()
    manager.poll()
    pool.free(pool.allocate(NUM_BLOCKS))
    manager.wait_idle()
    manager.poll()
    return [manager.stores[0].has_block(h) for h in hashes]


def test_auto_min_hits_stops_storing_prefixes_seen_once_when_nothing_is_reused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The window is the pool (16 blocks) and at least two requests here: two distinct
    # 8-block prompts fill it with no reuse, so from then on a prefix is stored only from
    # its second request.
    monkeypatch.setattr(manager_module, "REUSE_WINDOW_MIN_REQUESTS", 2)
    manager, pool, _, _ = make_manager("auto")
    assert stored_after_eviction(manager, pool, seed=1) == [True] * 8  # window not yet full
    assert manager.min_hits == 1
    stored_after_eviction(manager, pool, seed=2)
    assert manager.min_hits == 2 and manager.stats.store_min_hits == 2
    assert manager.stats.reuse_rate == 0.0
    rejected = manager.stats.num_rejected_min_hits
    assert stored_after_eviction(manager, pool, seed=3) == [False] * 8
    assert manager.stats.num_rejected_min_hits == rejected + 4  # its four chunks
    # The same prompt again: seen twice now, so it is stored, and reuse is back in the
    # window (8 of the last 16 blocks had been seen), so once-seen prefixes are stored again.
    assert stored_after_eviction(manager, pool, seed=3) == [True] * 8
    assert manager.stats.reuse_rate == 0.5 and manager.min_hits == 1
    assert stored_after_eviction(manager, pool, seed=4) == [True] * 8
    pool.check_integrity()
    manager.close()


@pytest.mark.parametrize("min_hits", [1, 2])
def test_a_fixed_min_hits_ignores_the_reuse_rate(min_hits: int) -> None:
    manager, pool, _, _ = make_manager(min_hits)
    for seed in (1, 2, 3):  # no reuse at all
        assert stored_after_eviction(manager, pool, seed) == [min_hits == 1] * 8
    assert manager.min_hits == min_hits
    manager.close()


def test_a_planned_entry_outlives_the_stores_that_need_its_room() -> None:
    """`lookup` pins what its plan names: the stores that allocating the request's blocks
    sets off (a full first tier evicting by LRU) take the next entries in LRU order, and the
    load then brings back every planned block. Pinned only in `start_load`, the plan's
    entry was the LRU victim and the load brought back nothing."""
    manager, pool, transfer, store = make_manager(min_hits=1)
    entries = []
    for seed in range(store.num_slots):  # a full tier; seed 0 is the least recently used
        hashes = prefix_hashes(seed, CHUNK_BLOCKS)
        meta = EntryMeta(hashes[-1], tuple(hashes), CHUNK_BLOCKS * LAYOUT.block_bytes)
        handle = store.prepare_store(meta)
        assert handle is not None
        handle.buffer.copy_(torch.randint(0, 256, (meta.num_bytes,), dtype=torch.uint8))
        store.complete_store(handle, True)
        entries.append((hashes, handle.buffer.clone()))
    planned_hashes, planned_bytes = entries[0]
    plan = manager.lookup(planned_hashes, 0, CHUNK_BLOCKS)
    assert plan is not None and plan.num_blocks == CHUNK_BLOCKS
    # Two freed requests' chunks go down as their blocks are evicted: the full tier makes
    # room for them by evicting seeds 1 and 2, passing over the pinned seed 0.
    for seed in (100, 101):
        finished_prefix(pool, manager, seed=seed, num_blocks=CHUNK_BLOCKS)
    pool.free(pool.allocate(NUM_BLOCKS))
    manager.wait_idle()
    manager.poll()
    assert store.stats.num_evictions == 2
    assert [store.has(hashes[-1]) for hashes, _ in entries[:3]] == [True, False, False]
    destination = pool.allocate(CHUNK_BLOCKS)
    assert manager.start_load("r", plan, destination, planned_hashes)
    (result,) = manager.poll()
    assert result.num_loaded_blocks == CHUNK_BLOCKS
    expected = transfer.entry_view(planned_bytes, CHUNK_BLOCKS)  # random bits: compare bits
    loaded = transfer.kv_cache[:, :, destination].contiguous()
    assert torch.equal(loaded.view(torch.uint8), expected.contiguous().view(torch.uint8))
    assert all(entry.pins == 0 for entry in store._entries.values())  # the load unpinned it
    manager.close()


def test_a_plan_given_back_unpins_its_entries() -> None:
    manager, pool, _, store = make_manager(min_hits=1)
    hashes, _ = finished_prefix(pool, manager, seed=3, num_blocks=CHUNK_BLOCKS)
    manager.store_lookahead(NUM_BLOCKS)
    manager.wait_idle()
    manager.poll()
    plan = manager.lookup(hashes, 0, CHUNK_BLOCKS)
    assert plan is not None
    assert store._entries[hashes[-1]].pins == 1
    manager.release_plan(plan)
    assert store._entries[hashes[-1]].pins == 0
    manager.close()


def test_a_retry_is_not_spent_on_an_entry_evicted_before_its_pin() -> None:
    """The tier is judged too slow, so a load runs only on a retry grant. An entry that a
    transfer thread evicts between `lookup`'s locate and its pin (simulated: the pin fails
    once) gets no load; the grant must stay for the next lookup, which then loads and
    measures the tier. Spent on the failed pin, it would put the tier off a whole interval."""
    now = [0.0]
    manager, pool, _, store = make_manager(min_hits=1)
    hashes, _ = finished_prefix(pool, manager, seed=3, num_blocks=CHUNK_BLOCKS)
    manager.store_lookahead(NUM_BLOCKS)
    manager.wait_idle()
    manager.poll()
    assert store.has(hashes[-1])
    # Then the tier's estimate falls to 1 kB/s, measured just now.
    manager.cost = CostModel(1e6, {"cpu": TierRate(1e3)}, clock=lambda: now[0])
    now[0] += 2 * CostModel.RETRY_AFTER_S
    pin = store.pin
    store.pin = lambda key: False  # evicted since `_locate`
    assert manager.lookup(hashes, 0, CHUNK_BLOCKS) is None
    store.pin = pin
    plan = manager.lookup(hashes, 0, CHUNK_BLOCKS)
    assert plan is not None and plan.num_blocks == CHUNK_BLOCKS
    assert manager.lookup(hashes, 0, CHUNK_BLOCKS) is None  # one grant per interval
    assert store._entries[hashes[-1]].pins == 1  # the refused lookup unpinned its entry
    manager.release_plan(plan)
    manager.close()


def test_a_reset_of_the_tiers_waits_for_the_demotions_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu (one slot) over disk: storing a second chunk demotes the first to disk, whose
    write runs in the background. `wait_idle` (what a prefix-cache reset with reset_tiers
    calls before `clear_stores`) must cover that write: before, it returned while the disk
    entry was still unpublished, the clear skipped it, and it landed after the reset."""
    slow_write = DiskStore._write

    def write(self: DiskStore, handle: object) -> bool:
        time.sleep(0.3)
        return slow_write(self, handle)  # type: ignore[arg-type]

    monkeypatch.setattr(DiskStore, "_write", write)
    kv_cache = torch.randn(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    pool = BlockPool(NUM_BLOCKS, enable_caching=True)
    cpu = CPUStore(LAYOUT, CHUNK_BLOCKS * LAYOUT.block_bytes, create_policy("lru"),
                   CHUNK_BLOCKS, pin_memory=False)
    disk = DiskStore(LAYOUT, 1 << 20, create_policy("lru"), str(tmp_path))
    cost = CostModel(1.0, {"cpu": TierRate(1e9), "disk": TierRate(1e9)})
    manager = TierManager(TierConfig(kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size),
                          [cpu, disk], KVTransfer(kv_cache), pool, LAYOUT.block_size, cost)
    pool.eviction_listener = manager
    first, _ = finished_prefix(pool, manager, seed=1, num_blocks=CHUNK_BLOCKS)
    manager.store_lookahead(NUM_BLOCKS)
    manager.wait_idle()
    second, _ = finished_prefix(pool, manager, seed=2, num_blocks=CHUNK_BLOCKS)
    manager.store_lookahead(NUM_BLOCKS)  # the first chunk goes down to disk
    manager.wait_idle()
    assert cpu.has(second[-1]) and disk.has(first[-1]), "the demotion has not landed"
    manager.clear_stores()
    manager.close()  # every write the manager started has finished
    assert not cpu.has_block(second[-1]) and not disk.has_block(first[-1])
    assert list(tmp_path.glob("*/*.kvt")) == []
