"""`AsyncEngine`: the synchronous `LLMEngine` stepping in its own thread, driven from asyncio.

    asyncio side (any loop)                      engine thread (owns the LLMEngine)
    add_request ──admission──► commands ──────►  drain commands: add / abort
        ▲                      (deque + Condition)   step() while there is work
        │ acceptance future                          expire timed-out requests
        └── RequestStream ◄── call_soon_threadsafe ◄─ publish snapshot, then deliver outputs

The LLMEngine is not thread-safe: every call to it (construction included) happens on the engine
thread, which sleeps on the condition when idle. `add_request` returns only once the engine
accepted the request, so errors reach the caller before any response starts. Closing a
`RequestStream` early (client gone, task cancelled) aborts its request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from kvtier.engine.async_types import (
    ABORT_MESSAGES,
    AbortCommand,
    AbortReason,
    AddCommand,
    EngineClosedError,
    EngineSnapshot,
    OutputBatch,
    OutputSink,
    QueueFullError,
    RequestAbortedError,
)
from kvtier.engine.engine import LLMEngine
from kvtier.model.tokenizer import Tokenizer
from kvtier.types import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

OutputListener = Callable[[list[RequestOutput], float], None]
"""Called on the engine thread with each batch of outputs and `time.monotonic()`, before the
outputs are delivered (metrics observe here, so a client never sees a token the metrics lack)."""

class RequestStream:
    """Async iterator over one request's outputs; the last one has `finished` set.

    Raises `RequestAbortedError` if the server aborted the request. Closing it (or leaving its
    `async with` block) before the request finished aborts the request.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, sink: OutputSink) -> None:
        self.request_id = request_id
        self._engine = engine
        self._sink = sink
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._sink.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        """Abort the request unless it already finished; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class AsyncEngine:
    """Owns an LLMEngine on a dedicated thread; the asyncio-facing serving API."""

    def __init__(self, engine_factory: Callable[[], LLMEngine], *,
                 max_waiting_requests: int | None = None,
                 request_timeout_s: float | None = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        if request_timeout_s is not None and request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        self._factory = engine_factory
        self.max_waiting_requests = max_waiting_requests
        self.request_timeout_s = request_timeout_s
        self._cond = threading.Condition()
        self._commands: deque[AddCommand | AbortCommand] = deque()
        self._num_pending_adds = 0  # under _cond: posted, not yet drained
        self._num_waiting = 0  # under _cond: the scheduler's waiting queue, last drain
        self._accepting = False
        self._stop = False
        self._listeners: tuple[OutputListener, ...] = ()
        self._sinks: dict[str, OutputSink] = {}  # engine thread only
        self._deadlines: dict[str, float] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._snapshot: EngineSnapshot | None = None
        self.engine: LLMEngine | None = None
        """Set once started; call it only from the engine thread."""
        self.model_name = ""
        self.max_model_len = 0
        self.tokenizer: Tokenizer | None = None
        """Read-only (encode, chat template), so the server may use it from another thread."""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Build the engine on its thread and start stepping; blocks until it is ready and
        re-raises whatever the construction raised."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._thread_main, args=(ready, failure),
                                        name="kvtier-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        assert self.engine is not None
        self.model_name, self.max_model_len = self.engine.model_name, self.engine.max_model_len
        self.tokenizer = self.engine.tokenizer
        self._accepting = True

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self.is_alive

    def add_listener(self, listener: OutputListener) -> None:
        self._listeners = (*self._listeners, listener)

    def snapshot(self) -> EngineSnapshot:
        """The latest published stats (updated after every drain and step)."""
        if self._snapshot is None:
            raise EngineClosedError("the engine has not started")
        return self._snapshot

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting; with `drain`, let live requests finish for up to `timeout_s`; abort
        the rest (their streams raise RequestAbortedError("shutdown")); then shut the engine
        down on its thread and join it."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while drain and self.is_alive and time.monotonic() < deadline and self._has_live():
            await asyncio.sleep(0.02)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _has_live(self) -> bool:
        snapshot = self._snapshot
        return self._num_pending_adds > 0 or (snapshot is not None
                                              and snapshot.num_live_requests > 0)

    # -- requests -----------------------------------------------------------------------------

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str | None = None,
                          arrival_time: float | None = None) -> RequestStream:
        """Queue a request and return its stream once the engine accepted it.

        Raises InvalidRequestError (bad prompt or parameters), QueueFullError, EngineClosedError.
        """
        loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        sink = OutputSink(loop)
        command = AddCommand(request_id, prompt, params, arrival_time or time.monotonic(), sink,
                       loop.create_future())
        with self._cond:
            if not self._accepting or not self.is_alive:
                raise EngineClosedError("the server is shutting down")
            limit = self.max_waiting_requests
            num_waiting = self._num_pending_adds + self._num_waiting
            if limit is not None and num_waiting >= limit:
                raise QueueFullError(num_waiting)
            self._num_pending_adds += 1
            self._commands.append(command)
            self._cond.notify()
        try:
            await command.accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # commands run in order: this abort follows the add
            raise
        return RequestStream(self, request_id, sink)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced; validation errors raise on the first
        `__anext__`. Closing the generator early aborts the request."""
        stream = await self.add_request(prompt, params, request_id)
        async with stream:
            async for output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished); its blocks are freed on the engine
        thread's next turn, which this call wakes."""
        with self._cond:
            self._commands.append(AbortCommand(request_id, None))
            self._cond.notify()

    # -- engine thread ------------------------------------------------------------------------

    def _thread_main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            self.engine = self._factory()
            self._publish(self.engine)
        except BaseException as exc:  # handed to start(), which re-raises it
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            self._loop(self.engine)
        except BaseException:
            logger.exception("the engine thread died")
            self._fail_all("error")
        finally:
            with self._cond:
                self._accepting = False
            with self._cond:
                leftover = list(self._commands)
                self._commands.clear()
            self._refuse_adds(leftover)
            try:
                self.engine.shutdown()
            except Exception:
                logger.exception("engine shutdown failed")

    def _loop(self, engine: LLMEngine) -> None:
        """Drain commands, step while there is work, sleep when idle; returns on stop."""
        has_work = idle_step = False
        while True:
            with self._cond:
                while not self._commands and not has_work and not self._stop:
                    self._cond.wait()
                if idle_step and not self._commands and not self._stop:
                    self._cond.wait(0.001)  # only tier loads in flight: do not spin
                commands = list(self._commands)
                self._commands.clear()
                stop = self._stop
            if stop:
                self._refuse_adds(commands)
                self._fail_all("shutdown")
                self._publish(engine, sum(isinstance(c, AddCommand) for c in commands))
                return
            num_adds = self._apply(engine, commands)
            self._expire(engine)
            outputs: list[RequestOutput] = []
            if engine.has_unfinished_requests():
                started = time.perf_counter()
                outputs = self._step(engine)
                # A step that produced nothing and took no time scheduled nothing.
                idle_step = not outputs and time.perf_counter() - started < 0.0005
            has_work = engine.has_unfinished_requests()
            batches = self._route(outputs)
            self._publish(engine, num_adds)  # we only get here with commands or work
            for loop, batch in batches.items():
                _call_soon(loop, _put_all, batch)

    def _apply(self, engine: LLMEngine, commands: list[AddCommand | AbortCommand]) -> int:
        """Run the commands in order; returns the number of adds (accepted or not)."""
        num_adds = 0
        for command in commands:
            if isinstance(command, AddCommand):
                num_adds += 1
                self._apply_add(engine, command)
            else:
                self._apply_abort(engine, command)
        return num_adds

    def _apply_add(self, engine: LLMEngine, command: AddCommand) -> None:
        error: Exception | None = None
        try:
            engine.add_request(command.prompt, command.params, command.request_id,
                               command.arrival_time)
            self._sinks[command.request_id] = command.sink
            if self.request_timeout_s is not None:
                self._deadlines[command.request_id] = command.arrival_time + self.request_timeout_s
        except Exception as exc:  # InvalidRequestError and anything unexpected: to the caller
            error = exc
        _call_soon(command.sink.loop, _settle, command.accepted, error)

    def _apply_abort(self, engine: LLMEngine, command: AbortCommand) -> None:
        output = engine.abort_request(command.request_id)
        sink = self._sinks.pop(command.request_id, None)
        self._deadlines.pop(command.request_id, None)
        if output is None:
            return
        self._notify_listeners([output])
        if sink is not None and command.reason is not None:
            _call_soon(sink.loop, sink.queue.put_nowait, RequestAbortedError(
                command.reason, output, ABORT_MESSAGES[command.reason]))

    def _expire(self, engine: LLMEngine) -> None:
        now = time.monotonic()
        for request_id in [r for r, deadline in self._deadlines.items() if deadline <= now]:
            self._apply_abort(engine, AbortCommand(request_id, "timeout"))

    def _step(self, engine: LLMEngine) -> list[RequestOutput]:
        try:
            outputs = engine.step()
        except Exception:
            # An engine bug must not take the server down: fail the live requests, keep going.
            logger.exception("engine step failed; aborting %d live requests", len(self._sinks))
            self._fail_all("error")
            return []
        self._notify_listeners(outputs)
        return outputs

    def _notify_listeners(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for listener in self._listeners if outputs else ():
            try:
                listener(outputs, now)
            except Exception:
                logger.exception("output listener %r failed", listener)

    def _route(self, outputs: list[RequestOutput]) -> dict[asyncio.AbstractEventLoop, OutputBatch]:
        """Group outputs by event loop (one wake-up per loop, not per output) and forget the
        finished requests before the snapshot counts live ones."""
        batches: dict[asyncio.AbstractEventLoop, OutputBatch] = {}
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            if output.finished:
                del self._sinks[output.request_id]
                self._deadlines.pop(output.request_id, None)
            batches.setdefault(sink.loop, []).append((sink, output))
        return batches

    def _publish(self, engine: LLMEngine, num_adds_drained: int = 0) -> None:
        """Publish a stats copy, and move drained adds from `pending` to the engine's own
        waiting count in one step, so admission never undercounts."""
        stats = copy.deepcopy(engine.get_stats())
        snapshot = EngineSnapshot(stats, engine.pool.num_free_blocks, engine.pool.num_blocks,
                                  num_live_requests=len(self._sinks))
        with self._cond:
            self._num_pending_adds -= num_adds_drained
            self._num_waiting = stats.num_waiting
            self._snapshot = snapshot

    def _fail_all(self, reason: AbortReason) -> None:
        """Abort every live request; an abort the engine refuses still ends the stream."""
        for request_id in list(self._sinks):
            try:
                assert self.engine is not None
                self._apply_abort(self.engine, AbortCommand(request_id, reason))
            except Exception:
                logger.exception("abort of %s failed", request_id)
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                _call_soon(sink.loop, sink.queue.put_nowait,
                           RequestAbortedError(reason, None, ABORT_MESSAGES[reason]))
        self._deadlines.clear()

    def _refuse_adds(self, commands: list[AddCommand | AbortCommand]) -> None:
        for command in commands:
            if isinstance(command, AddCommand):
                _call_soon(command.sink.loop, _settle, command.accepted,
                           EngineClosedError("the server is shutting down"))


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """Schedule `fn` on `loop` from the engine thread; a closed loop has nobody to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        pass
    elif error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _put_all(batch: OutputBatch) -> None:
    for sink, output in batch:
        sink.queue.put_nowait(output)
