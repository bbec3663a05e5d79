"""`reset_prefix_cache`: the next prompts are computed afresh, with the same tokens.

A device-only reset leaves the KV tiers what an eviction would have given them, so a prompt
comes back from the cpu tier (a benchmark's "cold device, warm tier" run); with the tiers it
empties them too. While a request is unfinished nothing is reset (vLLM's rule): its blocks
would stay cached. Every case ends with no block or tier pin leaked.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from kvtier import LLM, SamplingParams
from kvtier.config import EngineConfig
from kvtier.engine.async_engine import AsyncEngine, EngineClosedError
from kvtier.engine.engine import LLMEngine
from tests.e2e.test_tiered_engine import finish

MODEL = os.environ.get("KVTIER_TEST_TINY_MODEL", "random:tiny-llama")
BLOCK = 16
PROMPT = [random.Random(3).randrange(200, 40_000) for _ in range(200)]  # 12 full blocks
OTHER = [random.Random(4).randrange(200, 40_000) for _ in range(40)]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def make_llm(**tier_args: object) -> LLM:
    return LLM(MODEL, num_gpu_blocks_override=64, kv_tier_chunk_tokens=64, dtype="float32",
               **tier_args)


def test_a_reset_makes_the_next_prompt_cold_with_the_same_tokens() -> None:
    llm = make_llm()
    first = llm.generate([PROMPT], GREEDY)[0]
    warm = llm.generate([PROMPT], GREEDY)[0]
    assert warm.num_cached_tokens >= 12 * BLOCK - BLOCK
    assert llm.reset_prefix_cache() is True
    cold = llm.generate([PROMPT], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    assert cold.outputs[0].token_ids == warm.outputs[0].token_ids == first.outputs[0].token_ids
    finish(llm)


def test_the_tiers_keep_the_prefix_unless_they_are_reset_too(loads_always_pay: None) -> None:
    llm = make_llm(kv_tiers=("cpu:64MiB",))  # lazy: stored only when the device lets go
    first = llm.generate([PROMPT], GREEDY)[0]
    assert llm.engine.tiers.stores[0].num_entries == 0
    assert llm.reset_prefix_cache() is True
    from_tier = llm.generate([PROMPT], GREEDY)[0]
    hits = from_tier.metrics.num_tier_hit_tokens
    assert hits.get("device", 0) == 0 and hits["cpu"] >= 12 * BLOCK - BLOCK, hits
    result = llm.engine.reset_prefix_cache(reset_tiers=True)
    assert result.reset and result.device_blocks > 0 and result.tier_entries > 0, result
    assert llm.engine.tiers.stores[0].num_entries == 0
    assert llm.engine.tiers.stores[0].used_bytes == 0
    cold = llm.generate([PROMPT], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    assert cold.outputs[0].token_ids == from_tier.outputs[0].token_ids == first.outputs[0].token_ids
    finish(llm)


def test_a_reset_is_refused_while_a_request_is_unfinished() -> None:
    llm = make_llm()
    llm.generate([PROMPT], GREEDY)
    engine = llm.engine
    engine.add_request(OTHER, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # the request now holds blocks
    cached = dict(engine.pool._hash_to_block)
    result = engine.reset_prefix_cache()
    assert not result.reset and result.reason is not None and "unfinished (1)" in result.reason
    assert (result.device_blocks, result.tier_entries) == (0, 0)
    assert engine.pool._hash_to_block == cached  # nothing forgotten
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.reset_prefix_cache() is True
    assert llm.generate([PROMPT], GREEDY)[0].num_cached_tokens == 0
    finish(llm)


def test_an_async_engine_on_a_thread_resets_between_steps(loads_always_pay: None) -> None:
    """The core runs the reset between two steps and answers the caller's loop; once the
    engine has stopped, a reset is refused like a request."""
    config = EngineConfig.from_kwargs(model=MODEL, num_gpu_blocks_override=64,
                                      kv_tier_chunk_tokens=64, kv_tiers=("cpu:64MiB",))
    engine = AsyncEngine(lambda: LLMEngine(config))
    engine.start()

    async def last(prompt: list[int]):  # noqa: ANN202 - a RequestOutput
        return [out async for out in engine.generate(prompt, GREEDY)][-1]

    async def scenario() -> None:
        first = await last(PROMPT)
        result = await engine.reset_prefix_cache(reset_tiers=True)
        assert result.reset and result.device_blocks >= 12 and result.tier_entries == 0
        cold = await last(PROMPT)
        assert cold.num_cached_tokens == 0
        assert cold.outputs[0].token_ids == first.outputs[0].token_ids
        await engine.shutdown()
        with pytest.raises(EngineClosedError):
            await engine.reset_prefix_cache()

    asyncio.run(scenario())
