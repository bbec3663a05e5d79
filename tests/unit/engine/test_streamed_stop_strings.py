"""Stop strings in streamed outputs, step by step against the same request without them.

As vLLM's detokenizer: text that may be the start of an excluded stop string is held back
(at most the longest stop string minus one character), so no step ever sends text that the
final answer leaves out; with `include_stop_str_in_output` nothing is held back, since a stop
string found then stays in the text.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import LLM, SamplingParams

PROMPT = [100] * 5 + list(range(3000, 3040, 3))


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    # one request at a time, of 19 + 24 tokens: 64 blocks (not the CPU default of 262,144)
    with LLM("random:tiny-llama", num_gpu_blocks_override=64) as llm:
        yield llm


def streamed(llm: LLM, params: SamplingParams) -> tuple[list[str], str, str | int | None]:
    """The text each step's output streams (its running concatenation), the final text and
    the stop reason."""
    engine = llm.engine
    engine.add_request(PROMPT, params)
    sent, running, final = [], "", None
    while engine.has_unfinished_requests():
        for output in engine.step():
            running += output.new_text
            sent.append(running)
            if output.finished:
                final = output.outputs[0]
    assert final is not None
    return sent, final.text, final.stop_reason


def test_a_stream_never_sends_what_the_answer_leaves_out_nor_holds_back_kept_stops(
        llm: LLM) -> None:
    free_params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    free, free_text, _ = streamed(llm, free_params)
    assert len(free_text) >= 12

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data(), include=st.booleans())
    def check(data: st.DataObject, include: bool) -> None:
        # Stop strings cut from the free answer (so they are found, often across tokens),
        # and one that never appears but makes the hold-back long.
        stops = []
        for _ in range(data.draw(st.integers(1, 3))):
            start = data.draw(st.integers(0, len(free_text) - 1))
            stops.append(free_text[start:start + data.draw(st.integers(1, 6))])
        stops.append("\x07" * data.draw(st.integers(1, 8)))
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                stop=tuple(stops), include_stop_str_in_output=include)
        sent, text, stop_reason = streamed(llm, params)
        assert sent[-1] == text and stop_reason in stops
        assert free_text.startswith(text)
        for step, so_far in enumerate(sent[:-1]):
            assert text.startswith(so_far)  # nothing sent is taken back
            if include:  # as vLLM: no hold-back, each step sends what the free run sent
                assert so_far == free[step]
            else:
                assert len(free[step]) - len(so_far) <= max(map(len, stops)) - 1

    check()
