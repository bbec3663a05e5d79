"""Tool calls read out of answers in the hermes format (`--tool-call-parser hermes`), whole
and streamed: a stream cut anywhere reads the same content and calls as the whole answer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.server.tool_calls import ToolCallStream, parse_tool_calls, tool_call_stream

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'


def calls_of(answer_calls: tuple | list) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in answer_calls]


def test_an_answer_without_calls_is_all_content() -> None:
    answer = parse_tool_calls("It is sunny. <tool is a word here")
    assert answer.content == "It is sunny. <tool is a word here" and answer.tool_calls == ()


def test_calls_are_read_and_the_text_before_them_is_the_content() -> None:
    answer = parse_tool_calls("Let me check.\n" + WEATHER + "\n" + TIME)
    assert answer.content == "Let me check.\n"
    assert calls_of(answer.tool_calls) == [("get_weather", {"city": "Paris"}),
                                           ("get_time", {"zone": "CET"})]
    assert len({call.id for call in answer.tool_calls}) == 2
    assert all(call.id.startswith("chatcmpl-tool-") for call in answer.tool_calls)
    only = parse_tool_calls(WEATHER)
    assert only.content is None and len(only.tool_calls) == 1


def test_arguments_keep_non_ascii_and_parameters_is_read_as_arguments() -> None:
    answer = parse_tool_calls('<tool_call>{"name": "f", "parameters": {"q": "café"}}'
                              "</tool_call>")
    assert answer.tool_calls[0].arguments == '{"q": "café"}'
    no_arguments = parse_tool_calls('<tool_call>{"name": "now"}</tool_call>')
    assert no_arguments.tool_calls[0].arguments == "{}"


def test_a_final_call_cut_before_its_end_tag_counts_if_its_json_is_whole() -> None:
    answer = parse_tool_calls(WEATHER.removesuffix("</tool_call>"))
    assert calls_of(answer.tool_calls) == [("get_weather", {"city": "Paris"})]
    cut = '<tool_call>\n{"name": "get_weather", "argu'
    assert parse_tool_calls(cut).content == cut and parse_tool_calls(cut).tool_calls == ()


@pytest.mark.parametrize("bad", ["<tool_call>not json</tool_call>",
                                 '<tool_call>["f"]</tool_call>',
                                 '<tool_call>{"arguments": {}}</tool_call>'])
def test_a_call_that_is_not_a_named_json_object_leaves_the_answer_as_content(bad: str) -> None:
    text = "Hi " + WEATHER + bad
    assert parse_tool_calls(text).content == text
    assert parse_tool_calls(text).tool_calls == ()


def stream(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, dict]], int]:
    reader = ToolCallStream()
    content, calls = "", []
    edges = [0, *sorted(set(cuts)), len(text)]
    for start, end in zip(edges, edges[1:], strict=False):
        piece, new = reader.feed(text[start:end])
        content, calls = content + piece, calls + new
    piece, new = reader.finish()
    return content + piece, calls_of(calls + new), reader.num_calls


ANSWERS = ["plain text, no calls", "Let me check.\n" + WEATHER + "\n" + TIME,
           WEATHER, "a < b <tool_ca", WEATHER.removesuffix("</tool_call>"),
           "x <tool_call>oops</tool_call> y"]


@given(st.sampled_from(ANSWERS), st.lists(st.integers(0, 200), max_size=12))
def test_a_stream_cut_anywhere_reads_what_the_whole_answer_reads(text: str,
                                                                  cuts: list[int]) -> None:
    content, calls, num_calls = stream(text, [c for c in cuts if c <= len(text)])
    whole = parse_tool_calls(text)
    assert calls == calls_of(whole.tool_calls) and num_calls == len(calls)
    assert content == (whole.content or "")


def test_a_possible_start_tag_is_held_back_until_it_is_not_one() -> None:
    reader = ToolCallStream()
    assert reader.feed("Sure <tool") == ("Sure ", [])
    assert reader.feed("box> done") == ("<toolbox> done", [])
    assert reader.finish() == ("", [])


LLAMA_ONE = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_TWO = LLAMA_ONE + '; {"name": "get_time", "parameters": {"zone": "CET"}}'


def test_llama3_json_answers_are_calls_and_other_answers_are_content() -> None:
    for text in (LLAMA_ONE, "  " + LLAMA_ONE + "\n", "<|python_tag|>" + LLAMA_ONE):
        answer = parse_tool_calls(text, "llama3_json")
        assert answer.content is None
        assert calls_of(answer.tool_calls) == [("get_weather", {"city": "Paris"})]
    assert calls_of(parse_tool_calls(LLAMA_TWO, "llama3_json").tool_calls) == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    for text in ("The weather is fine.", '{"answer": 4}', LLAMA_ONE + " and then some",
                 '{"name": "f", "parameters": {', "<|python_tag|>print(1)"):
        answer = parse_tool_calls(text, "llama3_json")
        assert (answer.content, answer.tool_calls) == (text, ()), text


@given(st.sampled_from([LLAMA_ONE, LLAMA_TWO, "  " + LLAMA_TWO, "<|python_tag|>" + LLAMA_ONE,
                        "plain {text}", '{"not": "a call"}', "  ", "<|python",
                        LLAMA_ONE + " trailing"]),
       st.lists(st.integers(0, 120), max_size=10))
def test_a_llama3_json_stream_cut_anywhere_reads_what_the_whole_answer_reads(
        text: str, cuts: list[int]) -> None:
    reader = tool_call_stream("llama3_json")
    content, calls = "", []
    edges = [0, *sorted({c for c in cuts if c <= len(text)}), len(text)]
    for start, end in zip(edges, edges[1:], strict=False):
        piece, new = reader.feed(text[start:end])
        content, calls = content + piece, calls + new
    piece, new = reader.finish()
    whole = parse_tool_calls(text, "llama3_json")
    assert calls_of(calls + new) == calls_of(whole.tool_calls)
    assert reader.num_calls == len(whole.tool_calls)
    assert content + piece == (whole.content or "")


def test_a_llama3_answer_of_text_streams_as_it_comes() -> None:
    reader = tool_call_stream("llama3_json")
    assert reader.feed("  ") == ("", [])
    assert reader.feed("Hello") == ("  Hello", [])
    assert reader.feed(" there") == (" there", [])
