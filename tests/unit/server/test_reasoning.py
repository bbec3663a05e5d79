"""Reasoning split from answers (`--reasoning-parser`): whole and streamed alike, wherever
the stream is cut."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.server.reasoning import ReasoningStream, split_reasoning, thinks


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("<think>\nLet me add.\n</think>\n\n4", "\nLet me add.\n", "\n\n4"),
    ("Let me add.\n</think>\n\n4", "Let me add.\n", "\n\n4"),  # <think> in the prompt
    ("<think>still thinking", "still thinking", None),          # cut off: all reasoning
    ("<think></think>4", None, "4"),
    ("<thinking about</think>it", "<thinking about", "it"),
    ("<thi", "<thi", None),
])
def test_the_text_before_the_end_tag_is_the_reasoning(text: str, reasoning: str | None,
                                                      content: str | None) -> None:
    split = split_reasoning(text)
    assert (split.reasoning, split.content) == (reasoning, content)


@given(st.sampled_from(["<think>\nLet me add.\n</think>\n\n4 </think> stays",
                        "Let me add.\n</thi</think>\n\n4", "<think>cut <", "<thi", "",
                        "<think></think>", "</think>x"]),
       st.lists(st.integers(0, 60), max_size=10))
def test_a_stream_cut_anywhere_splits_as_the_whole(text: str, cuts: list[int]) -> None:
    stream = ReasoningStream()
    reasoning = content = ""
    edges = [0, *sorted({c for c in cuts if c <= len(text)}), len(text)]
    for start, end in zip(edges, edges[1:], strict=False):
        r, c = stream.feed(text[start:end])
        reasoning, content = reasoning + r, content + c
    r, c = stream.finish()
    whole = split_reasoning(text)
    assert (reasoning + r or None, content + c or None) == (whole.reasoning, whole.content)


def test_qwen3_honours_enable_thinking_false() -> None:
    assert thinks("qwen3", None) and thinks("qwen3", {"enable_thinking": True})
    assert not thinks("qwen3", {"enable_thinking": False})
    assert thinks("deepseek_r1", {"enable_thinking": False})
    assert not thinks(None, None)
