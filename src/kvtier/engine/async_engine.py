"""`AsyncEngine`: the engine core (`engine_core.EngineCore` around an `LLMEngine`) driven from
asyncio, on a thread of this process or in an engine process of its own.

    asyncio side (any loop)                     engine core (thread, or process via a pipe)
    add_request ──admission──► AddRequest ────►  take commands: add / abort / reset
        ▲                                        step() while there is work
        │ acceptance future                      expire timed-out requests
        └── RequestStream ◄── dispatch ◄──────── CoreUpdate: accepted, output deltas, aborts,
                              (listeners first)  stats snapshot

`AsyncEngine(factory)` runs the core on a thread (tests, embedding); `AsyncEngine.spawn(config)`
runs it in a child process (`kvtier serve`), so HTTP work never competes with steps for the
GIL. Either way every LLMEngine call happens on the core's thread, `add_request` returns only
once the engine accepted the request (errors reach the caller before any response starts), and
closing a `RequestStream` early (client gone, task cancelled) aborts its request and frees its
KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from kvtier.config import EngineConfig
from kvtier.engine.async_types import (
    ABORT_MESSAGES,
    EngineClosedError,
    EngineSnapshot,
    OutputBatch,
    OutputSink,
    QueueFullError,
    RequestAbortedError,
)
from kvtier.engine.core_messages import (
    AbortRequest,
    AddRequest,
    Command,
    CoreUpdate,
    ResetPrefixCache,
    StopCore,
    StreamState,
)
from kvtier.engine.engine_process import EngineClient, EngineProcess, EngineProcessSpec
from kvtier.model.generation_config import SamplingDefaults
from kvtier.model.tokenizer import Tokenizer
from kvtier.types import InvalidRequestError, PrefixCacheReset, RequestOutput, SamplingParams

if TYPE_CHECKING:  # the core's modules (torch, the model) load only where the core runs
    from kvtier.engine.engine import LLMEngine
    from kvtier.engine.engine_core import CommandInbox

logger = logging.getLogger(__name__)

OutputListener = Callable[[list[RequestOutput], float], None]
"""Called with each batch of outputs and the `time.monotonic()` they were produced at, before
the outputs are delivered (metrics observe here, so a client never sees a token the metrics
lack). It runs on the thread that dispatches the core's updates."""

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
        item = await self._sink.next()
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
    """Owns the engine core (on a thread, or in a process); the asyncio-facing serving API."""

    def __init__(self, engine_factory: Callable[[], LLMEngine] | None, *,
                 max_waiting_requests: int | None = None,
                 request_timeout_s: float | None = None,
                 process_spec: EngineProcessSpec | None = None,
                 connection: Connection | None = None) -> None:
        """Core on a thread built by `engine_factory`, or in a process: spawned by this
        engine (`spawn`), or shared with other front ends, reached through `connection`
        (`attach`)."""
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        if request_timeout_s is not None and request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if (engine_factory is None) == (process_spec is None):
            raise ValueError("give either an engine factory or a process spec")
        if connection is not None and process_spec is None:
            raise ValueError("an attached engine needs the process spec it was spawned with")
        self._factory = engine_factory
        self._process_spec = process_spec
        self._connection = connection
        self.max_waiting_requests = max_waiting_requests
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        # Under _lock: admission state, acceptance futures, the latest snapshot.
        self._accepting = False
        self._closed = False
        self._num_pending_adds = 0  # sent to the core, not yet taken by it
        self._num_waiting = 0  # the scheduler's waiting queue, last snapshot
        self._pending: dict[str, tuple[OutputSink, asyncio.Future[None]]] = {}
        self._resets: dict[str, asyncio.Future[PrefixCacheReset]] = {}
        """Cache resets sent to the core, by call id, not yet answered."""
        self._snapshot: EngineSnapshot | None = None
        self._streams: dict[str, tuple[OutputSink, StreamState]] = {}  # dispatch thread only
        self._listeners: tuple[OutputListener, ...] = ()
        self._inbox: CommandInbox | None = None
        self._process: EngineClient | None = None
        self._thread: threading.Thread | None = None
        """The core's thread, or (process mode) the thread that dispatches its updates."""
        self.engine: LLMEngine | None = None
        """Thread mode, once started; call it only from the engine thread."""
        self.model_name = ""
        self.max_model_len = 0
        self.max_logprobs = 0
        """The engine's cap on a request's logprobs (-1: the vocabulary), once started."""
        self.tokenizer: Tokenizer | None = None
        self.sampling_defaults = SamplingDefaults()
        """Values for the sampling fields a request leaves unset (the model's generation
        config, as vLLM's --generation-config)."""
        """Read-only (encode, chat template), so the server may use it from any thread."""

    @classmethod
    def spawn(cls, config: EngineConfig, *, max_waiting_requests: int | None = None,
              request_timeout_s: float | None = None, log_stats_interval_s: float | None = None,
              log_level: int | None = None) -> AsyncEngine:
        """An AsyncEngine whose core runs in a spawned engine process."""
        spec = EngineProcessSpec(
            config, request_timeout_s=request_timeout_s,
            log_stats_interval_s=log_stats_interval_s,
            log_level=logging.getLogger().level if log_level is None else log_level)
        return cls.from_spec(spec, max_waiting_requests=max_waiting_requests)

    @classmethod
    def from_spec(cls, spec: EngineProcessSpec, *,
                  max_waiting_requests: int | None = None) -> AsyncEngine:
        """An AsyncEngine that spawns its engine process from `spec` when started."""
        return cls(None, max_waiting_requests=max_waiting_requests,
                   request_timeout_s=spec.request_timeout_s, process_spec=spec)

    @classmethod
    def attach(cls, connection: Connection, spec: EngineProcessSpec, *,
               max_waiting_requests: int | None = None) -> AsyncEngine:
        """An AsyncEngine for one of several front ends of an engine process that someone
        else spawned (`spawn_engine_process`) with `spec`; `connection` is this front end's
        pipe to it."""
        return cls(None, max_waiting_requests=max_waiting_requests,
                   request_timeout_s=spec.request_timeout_s, process_spec=spec,
                   connection=connection)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Build the engine and start its core; blocks until it is ready and re-raises
        whatever the construction raised."""
        if self._process_spec is not None:
            self._start_process(self._process_spec)
        else:
            self._start_thread()
        with self._lock:
            self._accepting = True

    def _start_thread(self) -> None:
        from kvtier.engine.engine_core import CommandInbox

        ready = threading.Event()
        failure: list[BaseException] = []
        self._inbox = CommandInbox()
        self._thread = threading.Thread(target=self._thread_main, args=(ready, failure),
                                        name="kvtier-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        assert self.engine is not None
        self.model_name, self.max_model_len = self.engine.model_name, self.engine.max_model_len
        self.max_logprobs = self.engine.config.model.max_logprobs
        self.tokenizer = self.engine.tokenizer
        self.sampling_defaults = self.engine.sampling_defaults

    def _thread_main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        from kvtier.engine.engine_core import EngineCore

        assert self._factory is not None and self._inbox is not None
        try:
            self.engine = self._factory()
            core = EngineCore(self.engine, self._inbox, self._dispatch,
                              request_timeout_s=self.request_timeout_s,
                              overlap_outputs=self.engine.config.overlap_outputs,
                              async_scheduling=self.engine.async_scheduling)
            self._dispatch(core.initial_update())
        except BaseException as exc:  # handed to start(), which re-raises it
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            core.run()
        except BaseException:
            pass  # the core logged it and closed: its last update failed every request
        finally:
            self._on_core_gone()

    def _start_process(self, spec: EngineProcessSpec) -> None:
        from kvtier.model.loader import resolve_model
        process = (EngineProcess(spec) if self._connection is None
                   else EngineClient(self._connection))
        ready, first = process.start()
        self._process = process
        self.model_name, self.max_model_len = ready.model_name, ready.max_model_len
        self.max_logprobs = spec.config.model.max_logprobs
        self.sampling_defaults = ready.sampling_defaults
        # After the child is ready: it converted (and cached) the model files, if needed.
        self.tokenizer = resolve_model(spec.config.model.model,
                                       seed=spec.config.model.seed).tokenizer
        self._dispatch(first)
        self._thread = threading.Thread(target=self._receive, name="kvtier-engine-updates",
                                        daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        assert self._process is not None
        try:
            for update in self._process.updates():
                self._dispatch(update)
        except BaseException:
            logger.exception("dispatching the engine's updates failed")
        finally:
            self._on_core_gone()

    @property
    def is_alive(self) -> bool:
        # _closed first: the dispatcher thread outlives, briefly, its report that the core
        # is gone, and what it told the streams must agree with what this says.
        if self._closed:
            return False
        alive = self._thread is not None and self._thread.is_alive()
        return alive and (self._process is None or self._process.is_alive)

    def exit_status(self) -> str:
        """How the core ended, for messages: its process's exit code where this front end
        spawned it."""
        return "its thread ended" if self._process is None else self._process.exit_status()

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self.is_alive

    def add_listener(self, listener: OutputListener) -> None:
        self._listeners = (*self._listeners, listener)

    def snapshot(self) -> EngineSnapshot:
        """The latest published stats (updated after every turn of the core)."""
        if self._snapshot is None:
            raise EngineClosedError("the engine has not started")
        return self._snapshot

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting; with `drain`, let live requests finish for up to `timeout_s`; abort
        the rest (their streams raise RequestAbortedError("shutdown")); then shut the engine
        down and wait for its thread (and process)."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while drain and self.is_alive and time.monotonic() < deadline and self._has_live():
            await asyncio.sleep(0.02)
        if self._inbox is not None:
            self._inbox.stop()
        if self._process is not None:
            self._process.send(StopCore())
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join)
        if self._process is not None:
            await loop.run_in_executor(None, self._process.close)

    def _has_live(self) -> bool:
        # This front end's own requests: with several front ends on one engine, each drains
        # what it sent.
        return self._num_pending_adds > 0 or bool(self._streams)

    # -- requests -----------------------------------------------------------------------------

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str | None = None,
                          arrival_time: float | None = None,
                          cache_salt: str | None = None) -> RequestStream:
        """Queue a request and return its stream once the engine accepted it. `cache_salt`
        (vLLM's): only requests with the same salt share its cached KV.

        Raises InvalidRequestError (bad prompt or parameters), QueueFullError, EngineClosedError.
        """
        loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        sink = OutputSink(loop)
        accepted: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self._accepting or self._closed or not self.is_alive:
                raise EngineClosedError("the server is shutting down")
            limit = self.max_waiting_requests
            num_waiting = self._num_pending_adds + self._num_waiting
            if limit is not None and num_waiting >= limit:
                raise QueueFullError(num_waiting)
            # Acceptances and outputs are routed by id: a second add with a live id would
            # take the first one's (whose caller then waited forever).
            if request_id in self._pending or request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._num_pending_adds += 1
            self._pending[request_id] = (sink, accepted)
        self._send(AddRequest(request_id, prompt, params, arrival_time or time.monotonic(),
                              cache_salt=cache_salt))
        try:
            await accepted
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

    async def reset_prefix_cache(self, reset_tiers: bool = False) -> PrefixCacheReset:
        """Forget the device prefix cache (and, with `reset_tiers`, the KV tiers' entries)
        between two of the core's steps. Not done, with the reason, while requests are
        unfinished (any front end's). Raises EngineClosedError once the engine stops."""
        future: asyncio.Future[PrefixCacheReset] = asyncio.get_running_loop().create_future()
        call_id = f"reset-{uuid.uuid4().hex}"
        with self._lock:
            if self._closed or not self.is_alive:
                raise EngineClosedError("the server is shutting down")
            self._resets[call_id] = future
        self._send(ResetPrefixCache(call_id, reset_tiers))
        try:
            return await future
        finally:
            with self._lock:
                self._resets.pop(call_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished); its blocks are freed on the core's
        next turn, which this call wakes."""
        self._send(AbortRequest(request_id, None))

    def _send(self, command: Command) -> None:
        if self._inbox is not None:
            self._inbox.put(command)
        elif self._process is not None:
            self._process.send(command)  # a dead child: _on_core_gone settles everything

    # -- the core's updates (engine thread, or the process's update thread) -------------------

    def _dispatch(self, update: CoreUpdate) -> None:
        with self._lock:
            accepted = [(a, self._pending.pop(a.request_id, None)) for a in update.accepted]
            resets = [(r, self._resets.pop(r.call_id, None)) for r in update.resets]
        for reset, waiting in resets:
            if waiting is not None:
                _call_soon(waiting.get_loop(), _resolve, waiting, reset.result)
        for acceptance, pending in accepted:
            if pending is None:
                continue
            sink, future = pending
            if acceptance.error is None:
                self._streams[acceptance.request_id] = (sink, StreamState())
            _call_soon(sink.loop, _settle, future, acceptance.error)
        outputs: list[RequestOutput] = []
        batches: dict[asyncio.AbstractEventLoop, OutputBatch] = {}
        for delta in update.outputs:
            entry = self._streams.get(delta.request_id)
            if entry is None:
                continue
            sink, state = entry
            output = state.apply(delta)
            if delta.finished:
                del self._streams[delta.request_id]
            outputs.append(output)
            batches.setdefault(sink.loop, []).append((sink, output))
        failures: list[tuple[OutputSink, RequestAbortedError]] = []
        for aborted in update.aborted:
            entry = self._streams.pop(aborted.request_id, None)
            if entry is None:
                continue
            sink, state = entry
            final = None if aborted.final is None else state.apply(aborted.final)
            if final is not None:
                outputs.append(final)
            if aborted.reason is not None:
                failures.append((sink, RequestAbortedError(aborted.reason, final,
                                                           ABORT_MESSAGES[aborted.reason])))
        self._notify_listeners(outputs, update.time)
        with self._lock:
            self._num_pending_adds -= update.num_adds_drained
            if update.snapshot is not None:
                self._num_waiting = update.snapshot.stats.num_waiting
                self._snapshot = update.snapshot
            if update.closed:
                self._accepting = False
                self._closed = True
        for loop, batch in batches.items():
            _call_soon(loop, _put_all, batch)
        for sink, error in failures:
            _call_soon(sink.loop, sink.put, error)

    def _notify_listeners(self, outputs: list[RequestOutput], now: float) -> None:
        for listener in self._listeners if outputs else ():
            try:
                listener(outputs, now)
            except Exception:
                logger.exception("output listener %r failed", listener)

    def _on_core_gone(self) -> None:
        """The core stopped (or its process died): refuse adds it never took, end every
        stream it left open."""
        with self._lock:
            self._accepting = False
            self._closed = True
            pending, self._pending = self._pending, {}
            resets, self._resets = self._resets, {}
            self._num_pending_adds = 0
        for sink, future in pending.values():
            _call_soon(sink.loop, _settle, future,
                       EngineClosedError("the server is shutting down"))
        for waiting in resets.values():
            _call_soon(waiting.get_loop(), _settle, waiting,
                       EngineClosedError("the server is shutting down"))
        streams, self._streams = self._streams, {}
        if streams:
            logger.error("the engine stopped with %d requests live", len(streams))
        for sink, _ in streams.values():
            _call_soon(sink.loop, sink.put,
                       RequestAbortedError("error", None, ABORT_MESSAGES["error"]))


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """Schedule `fn` on `loop` from another thread; a closed loop has nobody to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        pass
    elif error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _resolve(future: asyncio.Future[PrefixCacheReset], result: PrefixCacheReset) -> None:
    if not future.done():  # the caller was cancelled meanwhile
        future.set_result(result)


def _put_all(batch: OutputBatch) -> None:
    for sink, output in batch:
        sink.put(output)
