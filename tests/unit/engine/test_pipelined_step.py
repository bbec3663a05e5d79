"""LLMEngine.step is pipelined by one step: a step returns the previous step's outputs.

What that must never cost: an output (every token arrives, in order, finished exactly once),
correctness after a stop string found one step late (the extra token is dropped, its blocks are
freed), and aborts between steps (the final output has every token; nothing follows it).
"""

from __future__ import annotations

import pytest

from kvtier import LLM, SamplingParams
from kvtier.engine.engine import LLMEngine

MODEL = "random:tiny-llama"
PROMPT = [11, 22, 33, 44, 55, 66, 77]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, max_model_len=256, num_gpu_blocks_override=64)


def drain(engine: LLMEngine) -> list:
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    return outputs


def test_outputs_arrive_one_step_later_and_none_is_lost(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request(PROMPT, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                       request_id="a")
    assert engine.step() == []  # the prefill ran; its token is reported by the next step
    assert engine.has_unfinished_requests()
    first = engine.step()
    assert [len(o.new_token_ids) for o in first] == [1] and not first[0].finished
    rest = drain(engine)
    outputs = first + rest
    assert [o.finished for o in outputs] == [False, False, False, True]
    assert [t for o in outputs for t in o.new_token_ids] == outputs[-1].outputs[0].token_ids
    expected = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0,
                                                     ignore_eos=True))[0].outputs[0]
    assert outputs[-1].outputs[0].token_ids == expected.token_ids
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_stop_string_found_a_step_late_drops_the_extra_token(llm: LLM) -> None:
    prompt = "The quick brown fox"
    free = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0,
                                                 ignore_eos=True))[0].outputs[0]
    tokenizer = llm.engine.tokenizer
    # The stop string is the text of the first three tokens: it is found when the third is
    # detokenised, one step after it was sampled, while the engine already computed a fourth.
    stop = tokenizer.decode(free.token_ids[:3])
    assert stop.strip() and stop not in tokenizer.decode(free.token_ids[:2])
    cut = 2
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                              stop=[stop]), request_id="stopped")
    outputs = drain(engine)
    final = outputs[-1]
    assert final.finished and sum(o.finished for o in outputs) == 1
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == stop
    assert final.outputs[0].token_ids == free.token_ids[:cut + 1]  # no token past the stop
    assert final.outputs[0].text == free.text[:free.text.index(stop)]
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert engine.stats.num_finished.get("stop", 0) >= 1


def test_abort_between_steps_returns_every_token_and_nothing_after(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request(PROMPT, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
                       request_id="aborted")
    streamed = []
    for _ in range(4):
        streamed.extend(engine.step())
    final = engine.abort_request("aborted")
    assert final is not None and final.finished
    assert final.outputs[0].finish_reason == "abort"
    # The last step's token was not reported yet: the abort's output carries it.
    assert len(final.outputs[0].token_ids) == len(streamed) + len(final.new_token_ids)
    assert len(final.new_token_ids) == 1
    assert drain(engine) == []
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
