"""The engine core's loop: take commands, step while there is work, report each turn.

    inbox (AddRequest / AbortRequest / ResetPrefixCache / stop)
        ─► EngineCore.run ─► emit(CoreUpdate)

It runs on the AsyncEngine's engine thread, or as the main loop of the engine process
(`engine_process`), where it has a GIL of its own: there the HTTP front end's parsing,
tokenisation and streaming never delay a step. The LLMEngine is not thread-safe: only this loop
calls it. Request timeouts are enforced here, where the clock and the engine meet.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from kvtier.engine.async_types import EngineClosedError, EngineSnapshot
from kvtier.engine.core_messages import (
    Aborted,
    AbortRequest,
    Accepted,
    AddRequest,
    CacheReset,
    Command,
    CoreUpdate,
    ResetPrefixCache,
    output_delta,
)
from kvtier.engine.engine import LaunchedStep, LLMEngine
from kvtier.request import Request
from kvtier.types import InvalidRequestError, PrefixCacheReset

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.001
"""With only tier transfers in flight (a step scheduled nothing), wait this long for a
command before stepping again, instead of spinning."""


class CommandInbox:
    """Commands for the core, in order, and the stop flag; any thread may put."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._commands: deque[Command] = deque()
        self._stopped = False

    def put(self, command: Command) -> None:
        if isinstance(command, AddRequest):
            command.received_time = time.monotonic()
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def take(self, wait_s: float | None) -> tuple[list[Command], bool]:
        """Everything queued and whether to stop; waits up to `wait_s` (None: forever, 0: not
        at all) while both are absent."""
        with self._cond:
            if not self._commands and not self._stopped and wait_s != 0:
                self._cond.wait_for(lambda: self._commands or self._stopped, wait_s)
            commands = list(self._commands)
            self._commands.clear()
            return commands, self._stopped


class EngineCore:
    def __init__(self, engine: LLMEngine, inbox: CommandInbox,
                 emit: Callable[[CoreUpdate], None], *, request_timeout_s: float | None = None,
                 separate_process: bool = False, overlap_outputs: bool = False,
                 async_scheduling: bool = False) -> None:
        """`emit` gets one update per turn. In a `separate_process` the updates are pickled:
        refusals other than InvalidRequestError become RuntimeErrors (which always unpickle)
        and stats are not deep-copied."""
        self.engine = engine
        self.inbox = inbox
        self.emit = emit
        self.request_timeout_s = request_timeout_s
        self.separate_process = separate_process
        self.overlap_outputs = overlap_outputs
        """Turn step N's results into outputs while the device runs step N+1 (see _loop)."""
        self.async_scheduling = async_scheduling
        """Schedule and launch step N+1 before reading step N's tokens (see _loop_async)."""
        self._deadlines: dict[str, float | None] = {}
        """Live requests (accepted, not finished) and their timeout deadline, if any."""
        self._announced: set[str] = set()
        """Live requests whose prompt went out with a delta already."""

    def initial_update(self) -> CoreUpdate:
        """The snapshot before any command, for the front end's start-up."""
        update = self._update(0)
        update.snapshot = self._snapshot()
        return update

    def run(self) -> None:
        """Loop until stopped; a crash of the loop itself fails every live request."""
        try:
            if self.async_scheduling:
                self._loop_async()
            else:
                self._loop()
        except BaseException:
            logger.exception("the engine loop died")
            update = self._update(0)
            self._fail_all(update, "error")
            self._finish(update)
            raise

    def _loop(self) -> None:
        # Each turn launches a step. Synchronous turns wait for its tokens and send its
        # outputs in the same turn. Overlapped turns (`overlap_outputs`) instead turn the
        # previous step's results into this turn's update while the device runs this step,
        # and apply this step's tokens at the end of the turn; either way, commands and
        # scheduling always see a settled engine.
        completed: list[Request] = []
        """Requests the previous step updated, their outputs not yet made (overlapped)."""
        idle_step = False
        while True:
            has_work = self.engine.has_unfinished_requests() or bool(completed)
            wait_s = IDLE_WAIT_S if idle_step else (0 if has_work else None)
            commands, stop = self.inbox.take(wait_s)
            num_adds = sum(isinstance(c, AddRequest) for c in commands)
            update = self._update(num_adds)
            if stop:
                self._deliver(update, completed)
                self._refuse(update, commands)
                self._fail_all(update, "shutdown")
                self._finish(update)
                return
            # Finished requests first: an abort or a timeout must not overtake a finish.
            # First tokens go with them: a client's TTFT (and, at low concurrency, when it
            # sends its next request) must not wait for the next step's launch.
            urgent: list[Request] = []
            rest: list[Request] = []
            for request in completed:
                first = request.request_id not in self._announced
                (urgent if request.is_finished or first else rest).append(request)
            self._deliver(update, urgent)
            self._apply(update, commands)
            self._expire(update)
            if self.overlap_outputs and update.outputs:
                self.emit(update)  # snapshot None: the next update brings the stats
                update = self._update(0)
            launched = None
            started = time.perf_counter()
            if self.engine.has_unfinished_requests():
                launched = self._launch(update)
            if self.overlap_outputs:
                self._deliver(update, rest)  # the previous step's other outputs, meanwhile
                update.snapshot = self._snapshot()
                self.emit(update)
                completed = [] if launched is None else self._complete(launched)
                produced = bool(completed)
            else:
                completed = [] if launched is None else self._complete(launched, update)
                self._deliver(update, completed)
                update.snapshot = self._snapshot()
                self.emit(update)
                produced, completed = bool(completed), []
            # A step that produced nothing and took no time scheduled nothing (requests wait
            # on transfers): poll the inbox with a short sleep instead of spinning.
            idle_step = (launched is not None and not produced
                         and time.perf_counter() - started < 0.0005)

    def _loop_async(self) -> None:
        # Each turn applies commands, launches the next step while the previous one still
        # runs on the device (the scheduler counts that step's tokens as in flight, and the
        # runner feeds each pending decode the token the previous step samples), then reads
        # the previous step's tokens and sends its outputs. The host's work of a turn thus
        # overlaps the device's step; commands still see a settled engine, because a request
        # added or aborted meanwhile only changes what the next launch schedules.
        in_flight: LaunchedStep | None = None
        idle_step = False
        while True:
            has_work = self.engine.has_unfinished_requests() or in_flight is not None
            wait_s = IDLE_WAIT_S if idle_step else (0 if has_work else None)
            commands, stop = self.inbox.take(wait_s)
            update = self._update(sum(isinstance(c, AddRequest) for c in commands))
            if stop:
                if in_flight is not None:
                    self._deliver(update, self._complete(in_flight, update))
                self._refuse(update, commands)
                self._fail_all(update, "shutdown")
                self._finish(update)
                return
            self._apply(update, commands)
            self._expire(update)
            started = time.perf_counter()
            launched = None
            if self.engine.has_unfinished_requests():
                launched = self._launch(update)
            worked = False
            if in_flight is not None:
                self._deliver(update, self._complete(in_flight, update))
                worked = bool(in_flight.scheduled.requests)
            update.snapshot = self._snapshot()
            self.emit(update)
            # Neither step had any work, and the launch took no time (requests wait on
            # transfers): poll the inbox with a short sleep instead of spinning.
            idle_step = (not worked and (launched is None or not launched.scheduled.requests)
                         and time.perf_counter() - started < 0.0005)
            in_flight = launched

    def _launch(self, update: CoreUpdate) -> LaunchedStep | None:
        try:
            return self.engine.launch_step()
        except Exception:
            self._step_failed(update)
            return None

    def _complete(self, launched: LaunchedStep,
                  update: CoreUpdate | None = None) -> list[Request]:
        """`update`: this turn's update, not yet sent; None once it has gone out (overlapped
        turn), and a failure then goes out in an update of its own."""
        try:
            return self.engine.complete_step(launched)
        except Exception:
            if update is not None:
                self._step_failed(update)
                return []
            update = self._update(0)
            self._step_failed(update)
            update.snapshot = self._snapshot()
            self.emit(update)
            return []

    def _step_failed(self, update: CoreUpdate) -> None:
        # An engine bug must not take the server down: fail the live requests, keep going.
        logger.exception("engine step failed; aborting %d live requests", len(self._deadlines))
        self._fail_all(update, "error")

    def _update(self, num_adds: int) -> CoreUpdate:
        return CoreUpdate(snapshot=None, num_adds_drained=num_adds, time=time.monotonic())

    def _finish(self, update: CoreUpdate) -> None:
        """The last update: refuse late commands, shut the engine down, report closed."""
        late, _ = self.inbox.take(0)
        self._refuse(update, late)
        update.num_adds_drained += sum(isinstance(c, AddRequest) for c in late)
        try:
            self.engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")
        update.snapshot = self._snapshot()
        update.closed = True
        self.emit(update)

    def _snapshot(self) -> EngineSnapshot:
        stats = self.engine.get_stats()
        if not self.separate_process:  # in-thread readers need a copy; pickling makes one
            stats = copy.deepcopy(stats)
        pool = self.engine.pool
        return EngineSnapshot(stats, pool.num_free_blocks, pool.num_blocks,
                              num_live_requests=len(self._deadlines))

    def _apply(self, update: CoreUpdate, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, AddRequest):
                self._add(update, command)
            elif isinstance(command, ResetPrefixCache):
                self._reset(update, command)
            else:
                self._abort(update, command)

    def _reset(self, update: CoreUpdate, command: ResetPrefixCache) -> None:
        try:
            result = self.engine.reset_prefix_cache(command.tiers)
        except Exception as exc:  # the caller gets the reason; the engine keeps serving
            logger.exception("prefix cache reset failed")
            result = PrefixCacheReset(False, reason=f"{type(exc).__name__}: {exc}")
        update.resets.append(CacheReset(command.call_id, result))

    def _add(self, update: CoreUpdate, command: AddRequest) -> None:
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id,
                                    command.arrival_time, command.received_time,
                                    cache_salt=command.cache_salt)
        except Exception as exc:  # InvalidRequestError and anything unexpected: to the caller
            update.accepted.append(Accepted(command.request_id, self._portable(exc)))
            return
        deadline = (None if self.request_timeout_s is None
                    else command.arrival_time + self.request_timeout_s)
        self._deadlines[command.request_id] = deadline
        update.accepted.append(Accepted(command.request_id))

    def _portable(self, exc: Exception) -> Exception:
        if not self.separate_process or isinstance(exc, InvalidRequestError):
            return exc
        return RuntimeError(f"{type(exc).__name__}: {exc}")

    def _abort(self, update: CoreUpdate, command: AbortRequest) -> None:
        output = self.engine.abort_request(command.request_id)
        live = command.request_id in self._deadlines
        self._forget(command.request_id)
        if output is None and not live:
            return
        final = None if output is None else output_delta(output, with_prompt=True)
        update.aborted.append(Aborted(command.request_id, command.reason, final))

    def _expire(self, update: CoreUpdate) -> None:
        now = time.monotonic()
        expired = [r for r, deadline in self._deadlines.items()
                   if deadline is not None and deadline <= now]
        for request_id in expired:
            self._abort(update, AbortRequest(request_id, "timeout"))

    def _deliver(self, update: CoreUpdate, completed: list[Request]) -> None:
        """The completed step's outputs, as deltas, for requests still live."""
        if not completed:
            return
        update.time = time.monotonic()
        for request in completed:
            request_id = request.request_id
            if request_id not in self._deadlines:
                continue
            delta = self.engine.make_delta(request, request_id not in self._announced)
            if delta is None:
                continue
            update.outputs.append(delta)
            self._announced.add(request_id)
            if delta.finished:
                self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._deadlines.pop(request_id, None)
        self._announced.discard(request_id)

    def _fail_all(self, update: CoreUpdate, reason: str) -> None:
        """Abort every live request; one the engine cannot abort still ends its stream."""
        for request_id in list(self._deadlines):
            try:
                self._abort(update, AbortRequest(request_id, reason))  # type: ignore[arg-type]
            except Exception:
                logger.exception("abort of %s failed", request_id)
                self._forget(request_id)
                update.aborted.append(Aborted(request_id, reason, None))  # type: ignore[arg-type]

    def _refuse(self, update: CoreUpdate, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, AddRequest):
                update.accepted.append(Accepted(
                    command.request_id, EngineClosedError("the server is shutting down")))
            elif isinstance(command, ResetPrefixCache):
                update.resets.append(CacheReset(command.call_id, PrefixCacheReset(
                    False, reason="the server is shutting down")))
