"""Plain records around `AsyncEngine`: the errors and stats snapshot it gives its callers, and
the output sinks that carry a request's outputs to its event loop."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Literal

from kvtier.engine.stats import EngineStats
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


class OutputSink:
    """Where a request's outputs go: held for its stream on the loop that awaits them.

    An output put while the one before it still waits is merged into it, as vLLM's output
    collector does. A consumer that fell behind (a busy event loop: 1,000 streams at once)
    thereby catches up in one response chunk instead of one per step, and the sink holds
    one output instead of one per step behind: the collector's young passes, which walk
    whatever is alive, find ~one object per stream. A consumer keeping up sees each step's
    output on its own. Nothing merges past a final output, and an error goes out after the
    outputs before it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._own_merge: RequestOutput | None = None
        """The held output this sink merged, whose lists nobody else has seen."""

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hold `item` for `next` (call on `loop`)."""
        last = self._items[-1] if self._items else None
        if (isinstance(item, RequestOutput) and isinstance(last, RequestOutput)
                and not last.finished):
            # Extending its own merge's lists, not copying them, keeps a stream whose reader
            # stopped (a client not reading) at each step's own tokens, not its whole backlog.
            merged = merge_outputs(last, item, extend_earlier=last is self._own_merge)
            self._items[-1] = self._own_merge = merged
        else:
            self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> RequestOutput | BaseException:
        """The next output (every output put since the last call, merged), or an error."""
        while not self._items:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if item is self._own_merge:  # the reader's now: never extended again
            self._own_merge = None
        return item


def merge_outputs(earlier: RequestOutput, later: RequestOutput, *,
                  extend_earlier: bool = False) -> RequestOutput:
    """One output standing for two consecutive ones of a request: `later`'s state (text,
    tokens, finish, metrics) with both steps' new text, tokens and logprobs. With
    `extend_earlier`, the result takes over `earlier`'s new-token and logprob lists and
    extends them (the caller owns them); else both outputs stay as they were."""
    prompt_logprobs = (later.prompt_logprobs if later.prompt_logprobs is not None
                       else earlier.prompt_logprobs)  # set on the first and final outputs
    token_ids = earlier.new_token_ids if extend_earlier else list(earlier.new_token_ids)
    logprobs = earlier.new_logprobs if extend_earlier else list(earlier.new_logprobs)
    token_ids.extend(later.new_token_ids)
    logprobs.extend(later.new_logprobs)
    return dataclasses.replace(
        later, new_text=earlier.new_text + later.new_text, new_token_ids=token_ids,
        new_logprobs=logprobs, prompt_logprobs=prompt_logprobs)


OutputBatch = list[tuple[OutputSink, RequestOutput]]
