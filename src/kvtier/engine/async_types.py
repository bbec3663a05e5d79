"""Plain records around `AsyncEngine`: the errors and stats snapshot it gives its callers, and
the output sinks that carry a request's outputs to its event loop."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Literal

from kvtier.engine.engine import EngineStats
from kvtier.types import RequestOutput

AbortReason = Literal["timeout", "shutdown", "error"]
ABORT_MESSAGES: dict[str, str] = {
    "timeout": "the request ran past the server's request timeout and was aborted",
    "shutdown": "the server shut down before the request finished",
    "error": "the engine failed while running the request",
}


class QueueFullError(RuntimeError):
    """Too many requests wait for their first schedule; retry after `retry_after_s` seconds."""

    def __init__(self, num_waiting: int, retry_after_s: int = 1) -> None:
        super().__init__(f"the server is overloaded: {num_waiting} requests are already waiting")
        self.retry_after_s = retry_after_s


class EngineClosedError(RuntimeError):
    """The engine is shutting down (or its thread died) and accepts no new requests."""


class RequestAbortedError(RuntimeError):
    """The server aborted a live request: it timed out, the server shut down, or a step failed.

    `output` holds what the request had produced up to the abort (None if nothing)."""

    def __init__(self, reason: AbortReason, output: RequestOutput | None, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.output = output


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine thread last published (copied, so readers never race the engine)."""

    stats: EngineStats
    num_free_blocks: int
    num_total_blocks: int
    num_live_requests: int
    """Requests accepted and not yet finished (waiting, loading or running)."""


@dataclass
class OutputSink:
    """Where a request's outputs go: its stream's queue, on the loop that awaits it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = dataclasses.field(
        default_factory=asyncio.Queue)
    _held: BaseException | None = dataclasses.field(default=None, init=False, repr=False)
    """An error that arrived behind outputs being merged: it goes out next."""

    async def next(self) -> RequestOutput | BaseException:
        """The next output, merged with every output queued behind it (then an error, if one
        followed them). A consumer that fell behind (a busy event loop: 1,000 streams at once)
        thereby catches up in one response chunk instead of one per step, as vLLM's output
        collector does, instead of falling further behind. A consumer keeping up sees each
        step's output on its own."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        item = await self.queue.get()
        while not isinstance(item, BaseException) and not item.finished and \
                not self.queue.empty():
            later = self.queue.get_nowait()
            if isinstance(later, BaseException):
                self._held = later
                break
            item = merge_outputs(item, later)
        return item


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of a request: `later`'s state (text,
    tokens, finish, metrics) with both steps' new text, tokens and logprobs."""
    prompt_logprobs = (later.prompt_logprobs if later.prompt_logprobs is not None
                       else earlier.prompt_logprobs)  # set on the first and final outputs
    return dataclasses.replace(
        later, new_text=earlier.new_text + later.new_text,
        new_token_ids=earlier.new_token_ids + later.new_token_ids,
        new_logprobs=earlier.new_logprobs + later.new_logprobs, prompt_logprobs=prompt_logprobs)


OutputBatch = list[tuple[OutputSink, RequestOutput]]
