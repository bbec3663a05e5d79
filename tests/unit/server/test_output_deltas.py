"""The engine core's deltas, built straight from the output processor's state, equal the
deltas of the RequestOutputs the offline API builds (`output_delta(make_output(...))`) in
every field: text held back for stop strings, stops, logprobs, prompt logprobs, finishes."""

from __future__ import annotations

import dataclasses
import pickle

from kvtier import LLM, SamplingParams
from kvtier.engine.core_messages import output_delta
from kvtier.types import OutputDelta

PROMPTS = [[100 + i] * 20 + list(range(300 + i, 320 + i)) for i in range(6)]
# 6 requests of at most 40 + 24 tokens (4 blocks each) fit with room to spare; the CPU's
# default pool (262,144 blocks) cost seconds to build per engine
ENGINE_ARGS = {"num_gpu_blocks_override": 64}


def comparable(delta: OutputDelta) -> dict[str, object]:
    fields = dataclasses.asdict(delta)
    fields["metrics"] = delta.metrics is not None  # two engines, two clocks
    return fields


def test_deltas_equal_those_of_request_outputs() -> None:
    reference = LLM("random:tiny-llama", **ENGINE_ARGS)
    free = reference.generate(PROMPTS[:1], SamplingParams(max_tokens=24, temperature=0.0,
                                                          ignore_eos=True))[0].outputs[0]
    stop_text = free.text[len(free.text) // 2:][:2]
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop_text]),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop_text],
                       include_stop_str_in_output=True),
        SamplingParams(max_tokens=10, temperature=0.0, logprobs=2, prompt_logprobs=1),
        SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop=["zz", "q"],
                       min_tokens=3),
        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    ]
    engines = [LLM("random:tiny-llama", **ENGINE_ARGS).engine for _ in range(2)]
    for engine in engines:
        for prompt, p in zip(PROMPTS, params, strict=True):
            engine.add_request(prompt, p)
    announced: list[set[str]] = [set(), set()]
    streams: list[list[dict[str, object]]] = [[], []]
    while engines[0].has_unfinished_requests():
        by_outputs, by_deltas = engines
        updated = by_outputs.complete_step(by_outputs.launch_step())
        for output in by_outputs.make_outputs(updated):
            streams[0].append(comparable(output_delta(output, output.request_id
                                                      not in announced[0])))
            announced[0].add(output.request_id)
        for request in by_deltas.complete_step(by_deltas.launch_step()):
            delta = by_deltas.make_delta(request, request.request_id not in announced[1])
            assert delta is not None
            streams[1].append(comparable(delta))
            announced[1].add(request.request_id)
    assert not engines[1].has_unfinished_requests()
    assert streams[0] == streams[1]
    finals = [d for d in streams[1] if d["finished"]]
    assert len(finals) == len(PROMPTS)
    assert any(d["stop_reason"] == stop_text for d in finals)  # a stop string cut the text
    assert any(d["prompt_logprobs"] for d in streams[1])
    assert any(d["new_logprobs"] for d in streams[1])


def every_field_set() -> dict[str, object]:
    """A distinct, non-default value for each of OutputDelta's fields."""
    from kvtier.types import RequestMetrics, TokenLogprobs
    return {
        "request_id": "req-1", "new_token_ids": [5, 6], "new_text": "ab", "finished": True,
        "finish_reason": "stop", "stop_reason": 7,
        "metrics": RequestMetrics(arrival_time=1.5, num_prompt_tokens=3,
                                  num_tier_hit_tokens={"cpu": 16}),
        "final_text": "final", "prompt": "the prompt", "prompt_token_ids": [1, 2, 3],
        "new_logprobs": [TokenLogprobs(token_id=5, logprob=-0.5, rank=1, top=((5, -0.5),))],
        "prompt_logprobs": [None, TokenLogprobs(token_id=2, logprob=-1.0, rank=2,
                                                top=((9, -0.1),))]}


def test_a_delta_crosses_the_engine_pipe_with_every_field() -> None:
    """OutputDelta pickles its fields by position (the engine process's wire format): each
    field, set to a distinct value, comes back in its own place."""
    values = every_field_set()
    assert set(values) == {f.name for f in dataclasses.fields(OutputDelta)}
    delta = OutputDelta(**values)
    back = pickle.loads(pickle.dumps(delta, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(back) is OutputDelta
    assert dataclasses.asdict(back) == dataclasses.asdict(delta)


def test_an_update_crosses_the_engine_pipe_with_every_delta_as_it_was() -> None:
    """CoreUpdate pickles its deltas as columns plus the other fields of the deltas that
    have any: plain, finished, first (prompt, metrics) and logprob deltas, in any order,
    come back equal, and so do the update's other fields."""
    from kvtier.engine.core_messages import Aborted, Accepted, CacheReset, CoreUpdate
    from kvtier.types import PrefixCacheReset, RequestMetrics, TokenLogprobs
    metrics = RequestMetrics(arrival_time=2.0, num_prompt_tokens=2)

    def plain(i: int) -> OutputDelta:
        return OutputDelta(f"r{i}", [i], f"t{i}", False, None, None, None)

    outputs = [plain(0),
               OutputDelta("first", [1], "", False, None, None, metrics, prompt="hi",
                           prompt_token_ids=[4, 5]),
               plain(1),
               OutputDelta("done", [2, 3], "ab", True, "stop", "ab", metrics, final_text="xab"),
               OutputDelta("lp", [6], "c", False, None, None, None,
                           new_logprobs=[TokenLogprobs(6, -0.1, 1, ((6, -0.1),))]),
               plain(2)]
    update = CoreUpdate(snapshot=None, num_adds_drained=3, time=7.5,
                        accepted=[Accepted("first"), Accepted("bad", ValueError("no"))],
                        outputs=outputs,
                        aborted=[Aborted("gone", "timeout", plain(9))], closed=True,
                        resets=[CacheReset("reset-1", PrefixCacheReset(True, 12, 3)),
                                CacheReset("reset-2", PrefixCacheReset(False, reason="busy"))])
    back = pickle.loads(pickle.dumps(update, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(back) is CoreUpdate
    assert [dataclasses.asdict(d) for d in back.outputs] == [dataclasses.asdict(d)
                                                             for d in outputs]
    assert all(type(d) is OutputDelta for d in back.outputs)
    assert (back.num_adds_drained, back.time, back.closed, back.snapshot) == (3, 7.5, True, None)
    assert [a.request_id for a in back.accepted] == ["first", "bad"]
    assert str(back.accepted[1].error) == "no" and back.aborted == update.aborted
    assert back.resets == update.resets
    empty = CoreUpdate(snapshot=None, num_adds_drained=0, time=0.0)
    assert pickle.loads(pickle.dumps(empty)).outputs == []


def test_any_one_field_beyond_the_columns_makes_a_delta_send_its_other_fields() -> None:
    """`_deltas_to_wire` names, field by field (for the engine loop's speed), what makes a
    delta more than plain: a field it missed, one added later included, would come back as
    its default."""
    from kvtier.engine.core_messages import _DELTA_COLUMNS, CoreUpdate
    values = every_field_set()
    for name in set(values) - set(_DELTA_COLUMNS):
        delta = OutputDelta("r", [1], "t", False, None, None, None)
        setattr(delta, name, values[name])
        update = CoreUpdate(snapshot=None, num_adds_drained=0, time=0.0, outputs=[delta])
        back = pickle.loads(pickle.dumps(update, protocol=pickle.HIGHEST_PROTOCOL))
        assert dataclasses.asdict(back.outputs[0]) == dataclasses.asdict(delta), name
