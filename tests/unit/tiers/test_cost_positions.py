"""Recomputing a prompt token costs more the more keys it attends: the cost model weighs each
token by its position, a lookup loads a run as far as it saves the most time (its end can pay
for its start), and admission judges a chunk as part of its whole prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier.config import TierConfig
from kvtier.kv.block_pool import BlockPool
from kvtier.tiers.base import EntryMeta, TierStore
from kvtier.tiers.chunks import chunk_runs
from kvtier.tiers.cost import CostModel, TierRate, attention_per_key
from kvtier.tiers.cpu import CPUStore
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.manager import TierManager
from kvtier.tiers.policy import create_policy
from kvtier.tiers.transfer import KVTransfer
from tests.unit.tiers.test_manager_stores import CHUNK_BLOCKS, LAYOUT, NUM_BLOCKS, prefix_hashes

ATTENTION = 0.1
"""attention_per_key of these tests: a token at position 10 costs twice one at 0."""
CHUNK_TOKENS = CHUNK_BLOCKS * LAYOUT.block_size  # 4


def test_attention_per_key_of_qwen2_5_1_5b() -> None:
    # 28 layers, hidden 1536, MLP 8960, 12 query heads and 2 KV heads of 128.
    per_key = attention_per_key(28, 1536, 8960, 12, 2, 128)
    # Attending 172k FLOPs per key against 2.6 GFLOPs of projections per token.
    assert 1 / 15_500 < per_key < 1 / 15_000
    cost = CostModel(100_000.0, {}, attention_per_key=per_key)
    # The last 256 tokens of a 16k-token prompt cost twice the first 256.
    assert cost.recompute_s(256, 16_128) / cost.recompute_s(256, 0) == pytest.approx(2.06,
                                                                                    abs=0.01)


def test_a_step_far_into_a_prompt_is_read_as_the_rate_at_position_0() -> None:
    cost = CostModel(1000.0, {}, attention_per_key=ATTENTION)
    # 100 tokens at mean position 40 weigh 100 * (1 + 4) = 500 tokens at position 0: in
    # 0.5 s that is the model's rate exactly, which observing it leaves as it was.
    cost.observe_prefill(100, 0.5, mean_position=40)
    assert cost.prefill_tokens_per_s == pytest.approx(1000.0)
    cost.observe_prefill(100, 0.5)  # the same time at position 0: a slower machine
    assert cost.prefill_tokens_per_s < 1000.0


def manager_over(num_chunks: int, min_hits: int = 1, store: TierStore | None = None,
                 step_overhead_s: float = 0.0) -> tuple[TierManager, TierStore, list[bytes]]:
    """A tier (cpu unless given) holding a prompt's first `num_chunks` chunks, where loading
    one chunk takes 8 ms and recomputing chunk j takes 4 * (1 + 0.1 * (4j + 1.5)) ms: the
    first three alone do not pay (4.6, 6.2, 7.8 ms), from the fourth on they do (9.4, 11.0,
    12.6 ms)."""
    store = store or CPUStore(LAYOUT, 8 * CHUNK_BLOCKS * LAYOUT.block_bytes,
                              create_policy("lru"), CHUNK_BLOCKS, pin_memory=False)
    hashes = prefix_hashes(3, num_chunks * CHUNK_BLOCKS)
    for chunk in chunk_runs(hashes, 0, len(hashes), CHUNK_BLOCKS):
        handle = store.prepare_store(EntryMeta(chunk.key, chunk.block_hashes,
                                               CHUNK_BLOCKS * LAYOUT.block_bytes))
        assert handle is not None
        store.complete_store(handle, True)
    chunk_bytes = CHUNK_BLOCKS * LAYOUT.block_bytes
    clock = lambda: 0.0  # noqa: E731 - no retry is ever due
    cost = CostModel(1000.0, {store.name: TierRate(chunk_bytes / 0.008, latency_s=0.0)},
                     clock=clock, attention_per_key=ATTENTION, step_overhead_s=step_overhead_s)
    kv_cache = torch.zeros(LAYOUT.num_layers, 2, NUM_BLOCKS, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim)
    manager = TierManager(TierConfig(kv_tier_chunk_tokens=CHUNK_TOKENS,
                                     kv_store_min_hits=min_hits),
                          [store], KVTransfer(kv_cache), BlockPool(NUM_BLOCKS),
                          LAYOUT.block_size, cost)
    return manager, store, hashes


def test_a_run_whose_end_pays_for_its_start_is_loaded_whole() -> None:
    manager, store, hashes = manager_over(6)
    # Saved so far after each chunk: -3.4, -5.2, -5.4, -4.0, -1.0, +3.6 ms.
    plan = manager.lookup(hashes, 0, len(hashes))
    assert plan is not None and plan.num_blocks == len(hashes)
    manager.release_plan(plan)
    assert all(entry.pins == 0 for entry in store._entries.values())


def test_a_run_that_never_saves_time_is_not_loaded_and_stays_unpinned() -> None:
    manager, store, hashes = manager_over(3)
    assert manager.lookup(hashes, 0, len(hashes)) is None
    assert manager.stats.num_rejected_cost == 1
    assert all(entry.pins == 0 for entry in store._entries.values())


def test_a_chunk_is_admitted_as_part_of_its_whole_prompt() -> None:
    manager, _, _ = manager_over(0)
    long_prompt = prefix_hashes(9, 6 * CHUNK_BLOCKS)
    short_prompt = prefix_hashes(10, CHUNK_BLOCKS)
    for prompt in (long_prompt, short_prompt):
        manager.note_request(prompt)
    first_of_long = chunk_runs(long_prompt, 0, len(long_prompt), CHUNK_BLOCKS)[0]
    only_of_short = chunk_runs(short_prompt, 0, len(short_prompt), CHUNK_BLOCKS)[0]
    # The long prompt: 48 ms to load against 51.6 to recompute. Its first chunk alone
    # would not pay (8 against 4.6 ms), the short prompt's only chunk does not.
    assert manager._admit(first_of_long)
    assert not manager._admit(only_of_short)


@pytest.mark.parametrize(("step_overhead_s", "loaded"), [(0.001, True), (0.005, False)])
def test_a_background_load_must_save_more_than_a_step(tmp_path: Path, step_overhead_s: float,
                                                      loaded: bool) -> None:
    # From disk the request waits for the load a step longer: the six chunks' 3.6 ms saved
    # pays for a 1 ms step, not for a 5 ms one.
    disk = DiskStore(LAYOUT, 1 << 30, create_policy("lru"), str(tmp_path))
    manager, _, hashes = manager_over(6, store=disk, step_overhead_s=step_overhead_s)
    plan = manager.lookup(hashes, 0, len(hashes))
    assert (plan is not None) == loaded
    if plan is not None:
        assert plan.num_blocks == len(hashes)
        manager.release_plan(plan)
