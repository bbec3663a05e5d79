"""On CUDA a store's gather (compute stream) and a load's scatter (scatter stream) may touch the
same device block: a lazy candidate evicted to make room for a load is copied down at its
eviction, and the load then writes new KV into that very block. The load's scatters wait for
the compute stream's pending work, so the store reads the block's old contents first; its
copies into the staging buffer do not wait, so they overlap the forward pass in flight.

Here the compute stream is held busy (a sleep kernel) when the eviction queues the gather; a
scatter that did not wait would overwrite the blocks ~tens of ms before the gather reads them.

On a GPU: `pytest -m gpu tests/gpu/test_tier_transfer_order.py`; skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from tests.unit.tiers.test_manager_stores import finished_prefix

from kvtier.config import TierConfig
from kvtier.kv.block_pool import BlockPool
from kvtier.tiers.base import KVLayout
from kvtier.tiers.cost import CostModel, TierRate
from kvtier.tiers.cpu import CPUStore
from kvtier.tiers.manager import TierManager
from kvtier.tiers.policy import create_policy
from kvtier.tiers.transfer import KVTransfer, LoadPart

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYOUT = KVLayout("order-test", "float32", num_layers=4, num_kv_heads=2, head_dim=64,
                  block_size=16, dtype_bytes=4)
NUM_BLOCKS, CHUNK_BLOCKS = 16, 4
SLEEP_CYCLES = 200_000_000
"""~0.1 s of the compute stream at H100/H200 clocks: far longer than the load's copy."""


def test_a_load_into_evicted_blocks_lands_after_their_store_read_them() -> None:
    shape = (LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size, LAYOUT.num_kv_heads,
             LAYOUT.head_dim)
    kv_cache = torch.randn(shape, device="cuda")
    pool = BlockPool(NUM_BLOCKS, enable_caching=True)
    store = CPUStore(LAYOUT, 8 * CHUNK_BLOCKS * LAYOUT.block_bytes, create_policy("lru"),
                     CHUNK_BLOCKS, pin_memory=True)
    transfer = KVTransfer(kv_cache)
    cost = CostModel(1.0, {"cpu": TierRate(1e9, latency_s=0.0)})  # every store pays
    manager = TierManager(TierConfig(kv_tier_chunk_tokens=CHUNK_BLOCKS * LAYOUT.block_size),
                          [store], transfer, pool, LAYOUT.block_size, cost)
    pool.eviction_listener = manager

    # A finished request's 8 cached blocks (two chunks): lazy candidates, nothing stored yet.
    hashes, blocks = finished_prefix(pool, manager, seed=7, num_blocks=8)
    original = kv_cache[:, :, blocks].clone()
    torch.cuda.synchronize()

    torch.cuda._sleep(SLEEP_CYCLES)  # the compute stream is busy: the gather runs late
    taken = pool.allocate(NUM_BLOCKS)  # evicts all 8: both chunks are stored at eviction
    assert manager.stats.num_stores_at_eviction == 2
    reused = [b for b in taken if b in blocks]
    # A load writes new KV into the reused blocks (one entry of len(reused) blocks).
    entry_shape = (LAYOUT.num_layers, 2, len(reused), LAYOUT.block_size, LAYOUT.num_kv_heads,
                   LAYOUT.head_dim)
    payload = torch.full(entry_shape, -7.0).pin_memory()
    transfer.copy_in_parts([LoadPart(payload.view(-1).view(torch.uint8), len(reused), 0,
                                     len(reused))], transfer.load_index(reused))
    torch.cuda.synchronize()
    manager.wait_idle()
    manager.poll()

    assert torch.equal(kv_cache[:, :, reused].cpu(), payload)  # the load landed
    for first in (0, CHUNK_BLOCKS):  # and the stores hold what the blocks held before it
        found = store.locate(hashes[first])
        assert found is not None
        stored = transfer.entry_view(store.read(found[0]), CHUNK_BLOCKS)
        assert torch.equal(stored, original[:, :, first:first + CHUNK_BLOCKS].cpu())
    pool.free(taken)
    manager.close()


def test_a_loads_host_copy_does_not_wait_for_the_compute_stream() -> None:
    shape = (LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size, LAYOUT.num_kv_heads,
             LAYOUT.head_dim)
    kv_cache = torch.zeros(shape, device="cuda")
    transfer = KVTransfer(kv_cache)
    blocks = [3, 5]
    entry_shape = (LAYOUT.num_layers, 2, len(blocks), LAYOUT.block_size, LAYOUT.num_kv_heads,
                   LAYOUT.head_dim)
    payload = torch.full(entry_shape, 2.5).pin_memory()
    torch.cuda.synchronize()

    torch.cuda._sleep(SLEEP_CYCLES)  # a forward pass in flight
    transfer.copy_in_parts([LoadPart(payload.view(-1).view(torch.uint8), len(blocks), 0,
                                     len(blocks))], transfer.load_index(blocks))
    transfer.load_stream.synchronize()  # the host-to-device copy is done...
    assert not torch.cuda.current_stream().query()  # ...while the compute stream still sleeps
    assert not transfer.scatter_stream.query()  # and the scatter still waits for it
    torch.cuda.synchronize()
    assert torch.equal(kv_cache[:, :, blocks].cpu(), payload)


def test_random_loads_keep_stream_order_under_allocator_churn() -> None:
    # Many loads of whole and partial chunks, each enqueued while the compute stream is busy
    # for a random time: work queued on the compute stream before a load still reads the
    # blocks' old contents, work ordered after it (`order_compute_after`) reads the loaded
    # ones, and allocations on both streams in between never recycle a staging buffer early.
    layers, blocks_total, per = 4, 512, 8
    kv_cache = torch.randn(layers, 2, blocks_total, LAYOUT.block_size, LAYOUT.num_kv_heads,
                           LAYOUT.head_dim, device="cuda")
    transfer = KVTransfer(kv_cache)
    generator = torch.Generator().manual_seed(0)
    for step in range(100):
        chosen = torch.randperm(blocks_total, generator=generator)[:96].tolist()
        num_parts = int(torch.randint(1, 12, (1,), generator=generator))
        count = per - 1 if step % 3 == 0 else per  # partial entries every third load
        payloads = [torch.randn(layers, 2, per, LAYOUT.block_size, LAYOUT.num_kv_heads,
                                LAYOUT.head_dim).pin_memory() for _ in range(num_parts)]
        parts = [LoadPart(p.view(-1).view(torch.uint8), per, 0, count) for p in payloads]
        targets = [b for i in range(num_parts) for b in chosen[i * per:i * per + count]]
        old = kv_cache[:, :, targets].clone()
        torch.cuda._sleep(int(torch.randint(0, 20_000_000, (1,), generator=generator)))
        before = kv_cache[:, :, targets].clone()  # queued before the load: old contents
        transfer.copy_in_parts(parts, transfer.load_index(targets))
        transfer.order_compute_after(transfer.load_event())
        after = kv_cache[:, :, targets].clone()
        churn = [torch.empty(1 << 20, device="cuda") for _ in range(4)]
        with torch.cuda.stream(transfer.load_stream):
            churn.append(torch.zeros(1 << 22, device="cuda"))
        torch.cuda.synchronize()
        expected = torch.cat([p[:, :, :count] for p in payloads], 2).cuda()
        assert torch.equal(before, old), f"load {step} overwrote blocks before queued reads"
        assert torch.equal(after, expected), f"load {step} not landed for later reads"
        del churn
