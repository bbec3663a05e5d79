"""OutputSink: a lagging consumer gets held outputs merged, in order, losing nothing."""

from __future__ import annotations

import asyncio

from kvtier.engine.async_engine import RequestAbortedError
from kvtier.engine.async_types import OutputSink
from kvtier.types import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs

PROMPT_LOGPROBS = [None, TokenLogprobs(5, -0.5, 1, ((5, -0.5),))]


def step_output(step: int, finished: bool = False, first: bool = False) -> RequestOutput:
    """The output of the request's step `step`: token 100 + step, text "s<step>"."""
    token = 100 + step
    return RequestOutput(
        "r", "prompt", [1, 5], [CompletionOutput(0, f"text after {step}", [token],
                                                 "length" if finished else None)],
        finished, RequestMetrics(arrival_time=0.0), new_text=f"s{step}",
        new_token_ids=[token], new_logprobs=[TokenLogprobs(token, -float(step), 1)],
        prompt_logprobs=PROMPT_LOGPROBS if first or finished else None)


def drain(sink: OutputSink) -> list[RequestOutput | BaseException]:
    async def take() -> list[RequestOutput | BaseException]:
        taken = []
        while True:
            item = await sink.next()
            taken.append(item)
            if isinstance(item, BaseException) or item.finished:
                return taken
    return asyncio.run(take())


def new_sink() -> OutputSink:
    return OutputSink(asyncio.new_event_loop())


def test_outputs_queued_behind_each_other_come_out_as_one() -> None:
    sink = new_sink()
    for step in range(4):
        sink.put(step_output(step, finished=step == 3, first=step == 0))
    (merged,) = drain(sink)
    assert isinstance(merged, RequestOutput)
    assert merged.new_text == "s0s1s2s3"
    assert merged.new_token_ids == [100, 101, 102, 103]
    assert [e.token_id for e in merged.new_logprobs] == [100, 101, 102, 103]
    assert merged.finished and merged.outputs[0].text == "text after 3"
    assert merged.prompt_logprobs == PROMPT_LOGPROBS


def test_first_output_keeps_its_prompt_logprobs_when_merged_with_later_ones() -> None:
    sink = new_sink()
    sink.put(step_output(0, first=True))
    sink.put(step_output(1))
    merged = asyncio.run(sink.next())
    assert isinstance(merged, RequestOutput) and not merged.finished
    assert merged.new_token_ids == [100, 101]
    assert merged.prompt_logprobs == PROMPT_LOGPROBS


def test_a_consumer_keeping_up_sees_every_step() -> None:
    sink = new_sink()
    seen = []
    for step in range(3):
        sink.put(step_output(step, finished=step == 2))
        seen.append(asyncio.run(sink.next()))
    assert [o.new_token_ids for o in seen] == [[100], [101], [102]]


def test_nothing_is_merged_past_the_final_output() -> None:
    sink = new_sink()
    sink.put(step_output(0))
    sink.put(step_output(1, finished=True))
    sink.put(step_output(2))  # a later stray (never sent by the engine)
    merged = asyncio.run(sink.next())
    assert isinstance(merged, RequestOutput) and merged.finished
    assert merged.new_token_ids == [100, 101]


def test_an_error_behind_outputs_comes_after_them() -> None:
    sink = new_sink()
    error = RequestAbortedError("timeout", None, "timed out")
    sink.put(step_output(0))
    sink.put(step_output(1))
    sink.put(error)
    taken = drain(sink)
    assert len(taken) == 2
    first, second = taken
    assert isinstance(first, RequestOutput) and first.new_token_ids == [100, 101]
    assert second is error


def test_a_lagging_stream_holds_one_output_however_far_behind() -> None:
    """Merged as they arrive: the sink never holds a step's output per step behind."""
    sink = new_sink()
    for step in range(50):
        sink.put(step_output(step))
        assert len(sink._items) == 1
    (merged,) = [asyncio.run(sink.next())]
    assert merged.new_token_ids == [100 + step for step in range(50)]


def test_a_waiting_consumer_wakes_for_the_next_output() -> None:
    async def scenario() -> list[RequestOutput | BaseException]:
        sink = OutputSink(asyncio.get_running_loop())
        taker = asyncio.ensure_future(sink.next())
        await asyncio.sleep(0)
        assert not taker.done()
        sink.put(step_output(0))
        first = await taker
        later = asyncio.ensure_future(sink.next())
        await asyncio.sleep(0)
        later.cancel()  # a consumer cancelled while waiting leaves the sink usable
        await asyncio.gather(later, return_exceptions=True)
        sink.put(step_output(1, finished=True))
        return [first, await sink.next()]

    first, last = asyncio.run(scenario())
    assert first.new_token_ids == [100] and last.new_token_ids == [101] and last.finished


def test_merging_leaves_every_output_it_was_given_as_it_was() -> None:
    """Listeners (metrics) saw each step's output before the sink: a merge copies their lists
    once and then extends only its own, and hands nothing it will extend to the reader."""
    sink = new_sink()
    given = [step_output(step) for step in range(4)]
    for output in given[:3]:
        sink.put(output)
    first = asyncio.run(sink.next())
    sink.put(given[3])
    sink.put(step_output(4, finished=True))
    second = asyncio.run(sink.next())
    assert [o.new_token_ids for o in given] == [[100], [101], [102], [103]]
    assert [len(o.new_logprobs) for o in given] == [1, 1, 1, 1]
    assert first.new_token_ids == [100, 101, 102]  # not extended after the reader took it
    assert second.new_token_ids == [103, 104] and second.finished


def test_a_stream_that_stops_reading_costs_each_step_its_own_tokens() -> None:
    """The held merge's lists are extended in place: one list object across the backlog."""
    sink = new_sink()
    sink.put(step_output(0))
    sink.put(step_output(1))
    held = sink._items[-1]
    token_list, logprob_list = held.new_token_ids, held.new_logprobs
    for step in range(2, 200):
        sink.put(step_output(step))
    merged = asyncio.run(sink.next())
    assert merged.new_token_ids is token_list and merged.new_logprobs is logprob_list
    assert merged.new_token_ids == [100 + step for step in range(200)]
