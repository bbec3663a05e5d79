"""Server-sent events: an incremental parser and the per-request recorder of OpenAI streams.

Both are pure (no sockets, no clock): the client feeds them bytes and timestamps, tests feed them
recorded byte streams cut at arbitrary places. The recorder applies vLLM's rules: a chunk is
"choice-carrying" when its `choices` list is non-empty (even with empty text, e.g. the chat
role chunk), TTFT is the first such chunk, every later one adds an ITL gap, and E2EL is the
last one; usage may arrive in any chunk, the last value wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvtier.bench.metrics import RequestFuncOutput


class SSEParser:
    """Splits a text/event-stream body into the `data` payloads of its events.

    Follows the WHATWG rules: lines end with CRLF, LF or CR; a blank line ends an event; `:`
    starts a comment; the `data` field drops one leading space; several data lines join with
    LF. Other fields (event, id, retry) are ignored. Bytes are kept undecoded until a line ends,
    so a UTF-8 character split across network chunks decodes correctly.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._data_lines: list[str] = []
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        """Consume bytes; return the data of every event completed by them, in order."""
        if not chunk:
            return []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        events: list[str] = []
        data = self._pending + chunk
        start = 0
        while True:
            end = _next_line_end(data, start)
            if end < 0:
                break
            if data[end] == 0x0D and end + 1 == len(data):
                self._after_cr = True
            self._take_line(data[start:end], events)
            start = end + (2 if data[end:end + 2] == b"\r\n" else 1)
        self._pending = data[start:]
        return events

    def finish(self) -> list[str]:
        """End of body: dispatch an event left without its closing blank line."""
        events: list[str] = []
        if self._pending:
            self._take_line(self._pending, events)
            self._pending = b""
        if self._data_lines:
            events.append("\n".join(self._data_lines))
            self._data_lines = []
        return events

    def _take_line(self, raw: bytes, events: list[str]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if not line:
            if self._data_lines:
                events.append("\n".join(self._data_lines))
                self._data_lines = []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data_lines.append(value[1:] if value.startswith(" ") else value)


def _next_line_end(data: bytes, start: int) -> int:
    """Index of the first CR or LF at or after `start`, or -1."""
    lf, cr = data.find(b"\n", start), data.find(b"\r", start)
    if lf < 0 or cr < 0:
        return max(lf, cr)
    return min(lf, cr)


@dataclass
class StreamRecorder:
    """Turns one response's event payloads into a `RequestFuncOutput` (times in seconds).

    `start_time` is when the request was sent; pass each payload with the time its network
    chunk arrived. `chat` picks `delta.content` over `text`.
    """

    start_time: float
    chat: bool = False
    chunk_times: list[float] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    done: bool = False
    error: str = ""

    def on_event(self, payload: str, now: float) -> None:
        """Record one `data:` payload. Raises ValueError (json.JSONDecodeError among them) on a
        malformed one."""
        if payload.strip() == "[DONE]":
            self.done = True
            return
        data = json.loads(payload)
        if not isinstance(data, dict):
            return
        if data.get("error") and not data.get("choices"):
            err = data["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
        choices = data.get("choices")
        if choices:
            self.chunk_times.append(now)
            self.text_parts.append(_choice_text(choices[0], self.chat))
        elif data.get("usage"):  # vLLM's client reads usage only from a chunk without choices
            self.usage = _checked_usage(data["usage"])

    def result(self, prompt_len: int) -> RequestFuncOutput:
        """The request's record; failed when no choice arrived. As in vLLM's client, an error
        event after some choices (a server that aborted the stream) leaves the request
        successful with what arrived; the error is kept in `stream_error`."""
        out = RequestFuncOutput(prompt_len=prompt_len, start_time=self.start_time)
        out.generated_text = "".join(self.text_parts)
        if self.usage:
            completion = self.usage.get("completion_tokens")
            out.output_tokens = int(completion) if completion is not None else None
            if self.usage.get("prompt_tokens") is not None:
                out.prompt_len = int(self.usage["prompt_tokens"])
        if self.chunk_times:
            times = self.chunk_times
            out.ttft = times[0] - self.start_time
            out.itl = [b - a for a, b in zip(times, times[1:], strict=False)]
            out.latency = times[-1] - self.start_time
        if self.error:
            out.stream_error = f"server error in stream: {self.error}"
        if not self.chunk_times:
            out.error = out.stream_error or "Never received a valid chunk to calculate TTFT."
        out.success = not out.error
        return out


def _checked_usage(usage: Any) -> dict[str, Any]:
    """`usage` if its token counts are whole numbers (or absent); else ValueError, so the
    request fails like any other garbled chunk instead of `result` raising out of the run."""
    counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens")] \
        if isinstance(usage, dict) else None
    if counts is None or not all(c is None or (isinstance(c, int) and not isinstance(c, bool))
                                 for c in counts):
        raise ValueError(f"malformed usage in stream: {str(usage)[:200]}")
    return usage


def _choice_text(choice: Any, chat: bool) -> str:
    if not isinstance(choice, dict):
        return ""
    if chat:
        delta = choice.get("delta") or {}
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")
