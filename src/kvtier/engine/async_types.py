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


OutputBatch = list[tuple[OutputSink, RequestOutput]]
