"""Tool calls read out of a chat answer's text (vLLM's `--tool-call-parser`).

`hermes` is the format of Qwen2.5 (and Hermes, and the many models trained on it): each call
is a JSON object `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`;
text before the first call is the message's content. As in vLLM, a call that is not valid
JSON leaves the whole answer as content, and a final call the generation cut off before its
end tag is still a call if its JSON is complete.

A stream is read as it comes (`ToolCallStream`): text goes out as content until a start tag
begins (a possible tag's first characters are held back), and each call goes out whole, in
one delta, once its end tag (or the answer's end) arrives.

`llama3_json` is Llama 3.1-3.3's format (its JSON-based tool calling): the whole answer is one
JSON object `{"name": ..., "parameters": {...}}`, or several separated by `;`, after an
optional `<|python_tag|>`. An answer that starts otherwise is content; one that starts with
`{` but is not such calls is content too. Streamed, such an answer is held until its end
(`JsonAnswerStream`), as its calls can only be told from text there.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from kvtier.server.tags import partial_tag_length

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
START_TAG, END_TAG = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str
    """OpenAI's form: the arguments object as a JSON string."""


@dataclass(frozen=True)
class ParsedAnswer:
    content: str | None
    """The text before the first call (None when there is none), or the whole answer."""
    tool_calls: tuple[ParsedToolCall, ...]


def parse_tool_calls(text: str, parser: str = "hermes") -> ParsedAnswer:
    """The content and tool calls of a whole answer, in `parser`'s format."""
    if parser == "llama3_json":
        return _parse_json_answer(text)
    start = text.find(START_TAG)
    if start < 0:
        return ParsedAnswer(text, ())
    calls = []
    for body in _call_bodies(text[start:]):
        call = _parse_call(body)
        if call is None:
            return ParsedAnswer(text, ())
        calls.append(call)
    return ParsedAnswer(text[:start] or None, tuple(calls))


def _call_bodies(text: str) -> list[str]:
    """The bodies of the calls in `text` (which starts with a start tag); the last may lack
    its end tag."""
    bodies = []
    while (start := text.find(START_TAG)) >= 0:
        text = text[start + len(START_TAG):]
        end = text.find(END_TAG)
        if end < 0:
            bodies.append(text)
            break
        bodies.append(text[:end])
        text = text[end + len(END_TAG):]
    return bodies


def _parse_call(body: str) -> ParsedToolCall | None:
    try:
        call: Any = json.loads(body)
    except ValueError:
        return None
    return _call_of(call)


def _call_of(call: Any) -> ParsedToolCall | None:
    """A decoded `{"name": ..., "arguments" (or "parameters"): ...}` as a call, else None."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ParsedToolCall(f"chatcmpl-tool-{uuid.uuid4().hex}", call["name"],
                          arguments if isinstance(arguments, str)
                          else json.dumps(arguments, ensure_ascii=False))


def _parse_json_answer(text: str) -> ParsedAnswer:
    """llama3_json: the answer as `;`-separated call objects, or as content."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return ParsedAnswer(text, ())
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            decoded, at = decoder.raw_decode(body, at)
        except ValueError:
            return ParsedAnswer(text, ())
        call = _call_of(decoded)
        if call is None:
            return ParsedAnswer(text, ())
        calls.append(call)
        rest = body[at:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:  # text after the calls: not a tool answer
            return ParsedAnswer(text, ())
        at = len(body) - len(rest)
    return ParsedAnswer(None, tuple(calls))


def tool_call_stream(parser: str) -> ToolCallStream | JsonAnswerStream:
    """A stream reader for `parser`'s format."""
    return JsonAnswerStream() if parser == "llama3_json" else ToolCallStream()


class JsonAnswerStream:
    """llama3_json, streamed: text goes out as it comes unless the answer starts with `{` (or
    the python tag), which is held to the end and then read as calls or sent as content."""

    def __init__(self) -> None:
        self._held = ""
        self._holding: bool | None = None
        """None until the answer's first visible characters decide."""
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        if self._holding is False:
            return text, []
        self._held += text
        if self._holding is None:
            head = self._held.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return "", []  # only whitespace, or a tag's beginning, so far
            self._holding = head.startswith(("{", PYTHON_TAG))
            if not self._holding:
                held, self._held = self._held, ""
                return held, []
        return "", []

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        held, self._held = self._held, ""
        if not self._holding:
            return held, []
        answer = _parse_json_answer(held)
        self.num_calls += len(answer.tool_calls)
        return answer.content or "", list(answer.tool_calls)


class ToolCallStream:
    """hermes, streamed: text deltas in, (content, completed calls) out."""

    def __init__(self) -> None:
        self._pending = ""
        """Text not yet sent: a possible start tag's beginning, or a call's body so far."""
        self._in_call = False
        self.num_calls = 0
        self._failed = False
        """A call was not valid JSON: the rest of the answer is sent as content."""

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """The content to send now and the calls completed by `text`."""
        if self._failed:
            return text, []
        self._pending += text
        content, calls = "", []
        while True:
            if not self._in_call:
                start = self._pending.find(START_TAG)
                if start < 0:
                    keep = partial_tag_length(self._pending, START_TAG)
                    if self.num_calls == 0:  # text between or after calls is not content
                        content += self._pending[:len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep:]
                    return content, calls
                if self.num_calls == 0:
                    content += self._pending[:start]
                self._pending = self._pending[start + len(START_TAG):]
                self._in_call = True
            end = self._pending.find(END_TAG)
            if end < 0:
                return content, calls
            call = _parse_call(self._pending[:end])
            if call is None:
                return content + self._fail(START_TAG + self._pending), calls
            calls.append(call)
            self.num_calls += 1
            self._pending, self._in_call = self._pending[end + len(END_TAG):], False

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """At the answer's end: a call cut off before its end tag, if its JSON is whole, else
        the held text as content."""
        pending, self._pending = self._pending, ""
        if self._failed or not pending:
            return pending if self._failed else "", []
        if self._in_call:
            call = _parse_call(pending)
            if call is not None:
                self.num_calls += 1
                return "", [call]
            return self._fail(START_TAG + pending), []
        return (pending if self.num_calls == 0 else ""), []

    def _fail(self, text: str) -> str:
        self._failed = True
        self._pending = ""
        return text

