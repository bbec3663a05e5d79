"""The engine's start-up warm-up (WARMUP_STEPS) reaches every prefill kernel variant that the
Triton backend's tile choice can select, so no served request waits for Triton to compile one.

A variant is what Triton compiles apart: the tile config (constexprs, warps, stages), whether
the KV is split (DIRECT) and which kernel runs (`prompt_kernel` reading the step's own K/V, or
the paged `prefill_kernel`), and the split count's bucket for the reduce kernel (launched
without PDL after a prefill, whatever the row count). On an H200 a fresh engine compiled the
paged kernel's long-prompt tiles during its first ShareGPT steps (1.7 s), because no warm-up
step took them. The choice is host logic, so this runs without a GPU, for the article's model
shape on an H200.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton

from kvtier.attention.base import AttentionMetadata
from kvtier.attention.triton_backend import TritonAttentionBackend
from kvtier.engine.engine import WARMUP_STEPS

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 12, 2, 128  # Qwen2.5-1.5B
H200_SMS = 132
BLOCK_SIZE = 16
POOL_TOKENS = 4096 * BLOCK_SIZE  # the article's --num-gpu-blocks-override 4096
TOKEN_BUDGET = 8192


def variant(steps: list[tuple[int, int]]) -> tuple:
    """The prefill kernel variant one step runs: `steps` is (cached context, new tokens) per
    sequence."""
    starts = [0, *itertools.accumulate(q for _, q in steps)]
    seq_lens = [c + q for c, q in steps]
    empty = torch.zeros(0, dtype=torch.int32)
    metadata = AttentionMetadata(
        num_tokens=starts[-1], num_seqs=len(steps), num_decodes=0, query_start_loc=empty,
        seq_lens=empty, block_table=empty, slot_mapping=empty, query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens, max_query_len=max(q for _, q in steps),
        max_seq_len=max(seq_lens), block_size=BLOCK_SIZE)
    backend = TritonAttentionBackend(num_sms=H200_SMS)
    backend.prepare(metadata)
    data = metadata.backend_data
    backend._choose_prefill_tiles(data, NUM_HEADS, HEAD_DIM)
    # A split step also runs the reduce kernel, compiled per power-of-two split bucket.
    split = data.prefill_splits > 1
    reduce_bucket = triton.next_power_of_2(data.prefill_splits) if split else 0
    return (data.prefill_config, not split, data.reads_own_kv, reduce_bucket)


def warm_up_steps() -> list[tuple[int, int]]:
    """WARMUP_STEPS fitted to the pool and budget, as `warm_up_prefill_kernels` does."""
    fitted = []
    for context, query in WARMUP_STEPS:
        query = min(query, TOKEN_BUDGET, POOL_TOKENS - 1)
        fitted.append((max(0, min(context, POOL_TOKENS - query)), query))
    return fitted


def served_steps() -> list[list[tuple[int, int]]]:
    """Steps a server takes: one or several prefills, whole prompts or chunks after a cached
    context, of lengths that are and are not multiples of 16, within the token budget."""
    contexts = [0, 15, 100, 512, 2047, 4096, 8000]
    queries = [2, 17, 64, 255, 300, 700, 1000, 1281, 1500, 2900, 4352, 6000, 8192]
    singles = [[(c, q)] for c, q in itertools.product(contexts, queries)]
    batches = [[(0, q)] * n for q in (64, 240, 700) for n in (2, 8, 32)
               if n * q <= TOKEN_BUDGET]
    mixed = [[(0, 300), (4096, 2000)], [(0, 2000), (512, 64)], [(2048, 4000), (0, 4000)]]
    return singles + batches + mixed


def test_warm_up_reaches_every_prefill_variant() -> None:
    reachable = {variant(step) for step in served_steps()}
    warmed = {variant([step]) for step in warm_up_steps()}
    assert reachable - warmed == set(), "variants a served step compiles after start-up"


@pytest.mark.parametrize("step", warm_up_steps())
def test_warm_up_steps_fit_the_pool_and_budget(step: tuple[int, int]) -> None:
    context, query = step
    assert 0 < query <= TOKEN_BUDGET and context + query <= POOL_TOKENS
