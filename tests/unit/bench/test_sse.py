"""sse.py: the SSE parser on recorded byte streams cut anywhere, and the stream recorder."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.bench.sse import SSEParser, StreamRecorder


def completion_chunk(text: str) -> str:
    return json.dumps({"id": "cmpl-1", "object": "text_completion",
                       "choices": [{"index": 0, "text": text, "finish_reason": None}]})


USAGE = json.dumps({"id": "cmpl-1", "choices": [],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
TEXTS = ["Hé", "llo ", "wörld 🌍"]
# A vLLM-shaped /v1/completions stream, with a keep-alive comment in the middle.
RECORDED = ("".join(f"data: {completion_chunk(t)}\n\n" for t in TEXTS[:2])
            + ": ping\n\n" + f"data: {completion_chunk(TEXTS[2])}\n\n"
            + f"data: {USAGE}\n\n" + "data: [DONE]\n\n").encode()
EXPECTED = [completion_chunk(t) for t in TEXTS] + [USAGE, "[DONE]"]


def parse_in_pieces(body: bytes, cuts: list[int]) -> list[str]:
    parser = SSEParser()
    events: list[str] = []
    bounds = [0, *sorted(set(cuts)), len(body)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        events += parser.feed(body[a:b])
    return events + parser.finish()


def test_whole_stream():
    assert parse_in_pieces(RECORDED, []) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=40))
def test_any_chunk_boundaries_give_the_same_events(cuts):
    """Network chunks may split lines, CR/LF pairs and multi-byte UTF-8 characters."""
    assert parse_in_pieces(RECORDED, cuts) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED) * 2), max_size=40))
def test_crlf_line_endings_any_boundaries(cuts):
    body = RECORDED.replace(b"\n", b"\r\n")
    assert parse_in_pieces(body, cuts) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=60), max_size=20))
def test_multiline_data_and_bare_cr(cuts):
    body = b"data: a\rdata:b\r\rid: 7\nevent: x\ndata:  c\n\n:comment\r\n"
    assert parse_in_pieces(body, cuts) == ["a\nb", " c"]


def test_unterminated_last_event_is_flushed_by_finish():
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]") == []
    assert parser.finish() == ["[DONE]"]


def test_recorder_applies_vllm_chunk_rules():
    rec = StreamRecorder(start_time=10.0)
    times = iter([10.5, 10.6, 10.9, 11.0, 11.0])
    for event in EXPECTED:
        rec.on_event(event, next(times))
    out = rec.result(prompt_len=99)
    assert out.success and rec.done
    assert out.generated_text == "".join(TEXTS)
    assert out.ttft == pytest.approx(0.5)
    assert out.itl == pytest.approx([0.1, 0.3])  # the usage chunk carries no choice
    assert out.latency == pytest.approx(0.9)
    assert (out.output_tokens, out.prompt_len) == (3, 12)  # usage wins over the dataset's count


def test_chat_role_chunk_counts_for_ttft():
    """vLLM's client counts any chunk with choices, including the empty role chunk."""
    rec = StreamRecorder(start_time=0.0, chat=True)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    word = {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    rec.on_event(json.dumps(role), 0.2)
    rec.on_event(json.dumps(word), 0.3)
    out = rec.result(prompt_len=5)
    assert (out.ttft, out.generated_text, out.output_tokens, out.prompt_len) == (0.2, "Hi", None, 5)


def test_no_choice_chunk_is_a_failure():
    rec = StreamRecorder(start_time=0.0)
    rec.on_event(USAGE, 0.1)
    rec.on_event("[DONE]", 0.1)
    out = rec.result(prompt_len=5)
    assert not out.success and "TTFT" in out.error


def test_error_event_after_choices_counts_as_vllm_counts_it():
    """vLLM's client ignores an error event: a stream the server aborted after some tokens is
    a success with those tokens. The error is kept apart, in stream_error."""
    rec = StreamRecorder(start_time=0.0)
    rec.on_event(completion_chunk("a"), 0.1)
    rec.on_event(completion_chunk("b"), 0.15)
    rec.on_event(json.dumps({"error": {"message": "engine died", "code": 500}}), 0.2)
    out = rec.result(prompt_len=5)
    assert out.success and out.error == "" and "engine died" in out.stream_error
    assert out.generated_text == "ab" and out.latency == pytest.approx(0.15)


def test_error_event_without_choices_is_a_failure():
    rec = StreamRecorder(start_time=0.0)
    rec.on_event(json.dumps({"error": {"message": "engine died", "code": 500}}), 0.2)
    out = rec.result(prompt_len=5)
    assert not out.success and "engine died" in out.error


def test_usage_on_a_content_chunk_is_ignored_as_vllm_ignores_it():
    rec = StreamRecorder(start_time=0.0)
    chunk = json.loads(completion_chunk("a"))
    chunk["usage"] = {"prompt_tokens": 7, "completion_tokens": 1}
    rec.on_event(json.dumps(chunk), 0.1)
    out = rec.result(prompt_len=5)
    assert (out.output_tokens, out.prompt_len) == (None, 5)


def test_malformed_json_raises():
    with pytest.raises(json.JSONDecodeError):
        StreamRecorder(start_time=0.0).on_event("{not json", 0.1)
