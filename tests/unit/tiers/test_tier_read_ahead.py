"""A load from a tier below host memory reads several entries at once and still lands each
block where its plan says; a failed read ends the load at the blocks before it, and no read
outlives the load. The shutdown's write-down writes several entries at once too."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from kvtier.config import TierConfig
from kvtier.kv.block_pool import BlockPool
from kvtier.kv.hashing import hash_block_tokens, root_block_hash
from kvtier.tiers.base import EntryMeta, KVLayout, StoreHandle
from kvtier.tiers.cost import CostModel, TierRate
from kvtier.tiers.cpu import CPUStore
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.manager import READ_AHEAD, TierManager
from kvtier.tiers.policy import create_policy
from kvtier.tiers.records import LoadResult
from kvtier.tiers.transfer import KVTransfer

LAYOUT = KVLayout("test-model", "float32", num_layers=2, num_kv_heads=1, head_dim=4,
                  block_size=2, dtype_bytes=4)
NUM_BLOCKS = 16
CHUNK_BLOCKS = 2
NUM_ENTRIES = 6
ENTRY_SHAPE = (LAYOUT.num_layers, 2, CHUNK_BLOCKS, LAYOUT.block_size, LAYOUT.num_kv_heads,
               LAYOUT.head_dim)


class SlowDiskStore(DiskStore):
    """A real disk store whose reads take 50 ms more, counting how many run at once."""

    def __init__(self, path: Path) -> None:
        super().__init__(LAYOUT, 1 << 30, create_policy("lru"), str(path))
        self._counter = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def read(self, meta: EntryMeta) -> torch.Tensor:
        with self._counter:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(0.05)
            return super().read(meta)
        finally:
            with self._counter:
                self.running -= 1


def stored_prefix(store: DiskStore) -> tuple[list[bytes], list[torch.Tensor], list[EntryMeta]]:
    """A 12-block prefix on disk in six 2-block entries of random K/V."""
    hashes, parent = [], root_block_hash("test-model")
    for i in range(NUM_ENTRIES * CHUNK_BLOCKS):
        parent = hash_block_tokens(parent, [7, i])
        hashes.append(parent)
    payloads, metas = [], []
    for i in range(NUM_ENTRIES):
        chunk = tuple(hashes[i * CHUNK_BLOCKS:(i + 1) * CHUNK_BLOCKS])
        meta = EntryMeta(chunk[-1], chunk, CHUNK_BLOCKS * LAYOUT.block_bytes)
        payload = torch.randn(ENTRY_SHAPE)
        handle = store.prepare_store(meta)
        assert handle is not None
        handle.buffer.copy_(payload.view(-1).view(torch.uint8))
        store.complete_store(handle, True)
        payloads.append(payload)
        metas.append(meta)
    return hashes, payloads, metas


def cpu_over_disk(cpu: CPUStore, disk: DiskStore) -> TierManager:
    """A manager of a cpu tier over a disk tier, both fast enough to be worth storing in."""
    kv_cache = torch.zeros(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return TierManager(TierConfig(kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size),
                       [cpu, disk], KVTransfer(kv_cache), BlockPool(NUM_BLOCKS),
                       LAYOUT.block_size, CostModel(1.0, {"cpu": TierRate(1e9),
                                                          "disk": TierRate(1e9)}))


def load_all(store: DiskStore, hashes: list[bytes]
             ) -> tuple[LoadResult, torch.Tensor, list[int], int]:
    """Plan and run a load of the whole prefix; (its result, the KV cache, the destination
    blocks, the reads still running when the result came back)."""
    kv_cache = torch.zeros(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    pool = BlockPool(NUM_BLOCKS)
    manager = TierManager(TierConfig(kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size),
                          [store], KVTransfer(kv_cache), pool, LAYOUT.block_size,
                          CostModel(1.0, {"disk": TierRate(1e9, latency_s=0.0)}))
    plan = manager.lookup(hashes, 0, len(hashes))
    assert plan is not None and len(plan.segments) == NUM_ENTRIES
    # Destinations in a scrambled order: each block must land where the index says.
    blocks = torch.randperm(NUM_BLOCKS)[:len(hashes)].tolist()
    assert not manager.start_load("r", plan, blocks, hashes)
    results: list[LoadResult] = []
    deadline = time.monotonic() + 30.0
    while not results and time.monotonic() < deadline:
        manager.wait_for_transfer(0.1)
        results = manager.poll()
    running_at_result = store.running
    manager.close()
    assert len(results) == 1
    return results[0], kv_cache, blocks, running_at_result


def test_reads_overlap_and_every_block_lands_in_order(tmp_path: Path) -> None:
    store = SlowDiskStore(tmp_path)
    hashes, payloads, _ = stored_prefix(store)
    result, kv_cache, blocks, _ = load_all(store, hashes)
    assert result.num_loaded_blocks == len(hashes)
    assert result.hit_blocks_per_tier == {"disk": len(hashes)}
    assert torch.equal(kv_cache[:, :, blocks], torch.cat(payloads, dim=2))
    assert store.most_at_once == min(READ_AHEAD, NUM_ENTRIES) > 1


def test_a_failed_read_ends_the_load_before_it_and_no_read_outlives_the_load(
        tmp_path: Path) -> None:
    store = SlowDiskStore(tmp_path)
    hashes, payloads, metas = stored_prefix(store)
    damaged = store._path(metas[2].key)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # the payload's last byte: its checksum no longer matches
    damaged.write_bytes(bytes(data))
    result, kv_cache, blocks, running_at_result = load_all(store, hashes)
    loaded = 2 * CHUNK_BLOCKS
    assert result.num_loaded_blocks == loaded
    assert torch.equal(kv_cache[:, :, blocks[:loaded]], torch.cat(payloads[:2], dim=2))
    assert not kv_cache[:, :, blocks[loaded:]].any()
    assert running_at_result == 0
    assert not store.has(metas[2].key)  # the damaged entry is dropped
    store.check_integrity()


class SlowWritingDiskStore(DiskStore):
    """A real disk store whose writes take 50 ms more, counting how many run at once."""

    def __init__(self, path: Path, capacity_bytes: int = 1 << 30) -> None:
        super().__init__(LAYOUT, capacity_bytes, create_policy("lru"), str(path))
        self._counter = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def complete_store(self, handle: StoreHandle, success: bool) -> None:
        with self._counter:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(0.05)
            super().complete_store(handle, success)
        finally:
            with self._counter:
                self.running -= 1


def test_write_down_writes_the_newest_that_fit_several_at_once(
        tmp_path: Path) -> None:
    cpu = CPUStore(LAYOUT, 16 * CHUNK_BLOCKS * LAYOUT.block_bytes, create_policy("lru"),
                   CHUNK_BLOCKS, pin_memory=False)
    _, payloads, metas = stored_prefix(cpu)
    probe = DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(tmp_path / "probe"))
    room = 4 * probe._entry_bytes(metas[0])  # four of the six entries fit
    disk = SlowWritingDiskStore(tmp_path / "disk", room)
    manager = cpu_over_disk(cpu, disk)
    # Only the newest four are written (the two oldest would be evicted by them), at once.
    assert manager.write_down() == 4
    assert disk.most_at_once == 4
    assert disk.running == 0
    assert [disk.has(meta.key) for meta in metas] == [False, False, True, True, True, True]
    for meta, payload in zip(metas[2:], payloads[2:], strict=True):
        assert torch.equal(disk.read(meta), payload.view(-1).view(torch.uint8))
    disk.check_integrity()
    manager.close()


def test_write_down_stops_copying_into_a_tier_whose_writes_fail(tmp_path: Path) -> None:
    """A lower tier that stopped taking writes (its folder gone here; a Redis server that
    stopped answering costs each write its timeouts, ~10 s): the shutdown's copy gives up on
    it after the writes already in flight, and counts nothing as copied. Before, it tried
    every entry (minutes against a hung server) and reported them all copied."""
    cpu = CPUStore(LAYOUT, 32 * CHUNK_BLOCKS * LAYOUT.block_bytes, create_policy("lru"),
                   CHUNK_BLOCKS, pin_memory=False)
    parent = root_block_hash("test-model")
    for i in range(32):
        parent = hash_block_tokens(parent, [3, i])
        handle = cpu.prepare_store(EntryMeta(parent, (parent,), LAYOUT.block_bytes))
        assert handle is not None
        cpu.complete_store(handle, True)
    disk = SlowWritingDiskStore(tmp_path / "disk")
    disk.root.rename(tmp_path / "moved-away")  # every write fails
    manager = cpu_over_disk(cpu, disk)
    assert manager.write_down() == 0
    assert 1 <= disk.stats.num_errors <= READ_AHEAD + 1
    assert disk.num_entries == 0
    disk.check_integrity()
    manager.close()
