"""A reasoning model's thinking, split from its answer (vLLM's `--reasoning-parser`).

DeepSeek-R1 (and its Qwen and Llama distills) and Qwen3 think first, between `<think>` and
`</think>`; their chat templates often open the `<think>` in the prompt, so the answer may
begin inside it. Text before `</think>` is the reasoning (a leading `<think>` dropped), text
after it the content; an answer cut off before `</think>` is all reasoning. Responses carry it
as `reasoning` (vLLM's field) and `reasoning_content` (its older name, which DeepSeek's API
and many clients read). `qwen3` is the same split, off for a request whose
`chat_template_kwargs` set `enable_thinking: false` (the template then tells the model not to
think, and the whole answer is content).

A stream is split as it comes (`ReasoningStream`): a possible tag's first characters are held
back until the next text shows whether it is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvtier.server.tags import partial_tag_length

REASONING_PARSERS = ("deepseek_r1", "qwen3")
START_TAG, END_TAG = "<think>", "</think>"


@dataclass(frozen=True)
class SplitAnswer:
    reasoning: str | None
    content: str | None


def thinks(parser: str | None, template_kwargs: Mapping[str, Any] | None) -> bool:
    """Whether a request's answer is split with `parser` (None: the server has none)."""
    if parser is None:
        return False
    return not (parser == "qwen3" and (template_kwargs or {}).get("enable_thinking") is False)


def split_reasoning(text: str) -> SplitAnswer:
    """The reasoning and the content of a whole answer."""
    stream = ReasoningStream()
    reasoning, content = stream.feed(text)
    more_reasoning, more_content = stream.finish()
    return SplitAnswer((reasoning + more_reasoning) or None, (content + more_content) or None)


class ReasoningStream:
    """One streamed choice: text deltas in, (reasoning, content) deltas out."""

    def __init__(self) -> None:
        self._pending = ""
        """Held back: the answer's first characters while they may be `<think>`, or a
        possible `</think>`'s first ones."""
        self._started = False
        """Past the point where a leading `<think>` could still come."""
        self._thinking = True

    def feed(self, text: str) -> tuple[str, str]:
        if not self._thinking:
            return "", text
        self._pending += text
        if not self._started:
            if START_TAG.startswith(self._pending):
                return "", ""  # the answer so far may be the tag itself
            self._started = True
            self._pending = self._pending.removeprefix(START_TAG)
        end = self._pending.find(END_TAG)
        if end >= 0:
            reasoning, content = self._pending[:end], self._pending[end + len(END_TAG):]
            self._pending, self._thinking = "", False
            return reasoning, content
        keep = partial_tag_length(self._pending, END_TAG)
        reasoning = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return reasoning, ""

    def finish(self) -> tuple[str, str]:
        """At the answer's end: what was held back is reasoning (a cut-off thought)."""
        pending, self._pending = self._pending, ""
        if not self._started:
            pending = pending.removeprefix(START_TAG)
        return (pending, "") if self._thinking else ("", pending)

