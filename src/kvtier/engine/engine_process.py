"""The engine core in a process of its own, as vLLM's EngineCore runs beside its API server.

    front end process                                engine process (spawned)
    AsyncEngine ─ send(AddRequest/AbortRequest/Stop) ─► reader thread ─► CommandInbox
         ▲                                                                  │
         └─ receiver thread ◄──────── CoreUpdate per turn ◄──── EngineCore.run (main thread)

With the engine in the HTTP server's process, every step competed for one GIL with request
parsing, tokenisation and token streaming; on a GPU that doubled the time of eager steps
(workload P: 13.3 req/s served over HTTP against 25.8 req/s for the same engine driven
in-process). Here the core has its own interpreter.

The child ignores SIGINT and SIGTERM: its front ends drain and then stop it (a Ctrl-C, or a
`kill` of the whole process group, reaches it too, and must not cut that drain short or
skip the tiers' shutdown flush). It leaves when its pipes close, so it never outlives the
server. With several front ends (`core_fanout`) it stops once the last one has.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from kvtier.config import ConfigError, EngineConfig
from kvtier.engine.core_messages import Command, CoreUpdate, StopCore
from kvtier.model.generation_config import SamplingDefaults
from kvtier.model.spec import ModelLoadError
from kvtier.utils.gc_pauses import freeze_startup_heap, log_long_gc_pauses
from kvtier.utils.gil import shorten_switch_interval
from kvtier.utils.profiling import engine_profile_dir, profiled
from kvtier.utils.thread_names import name_os_threads

if TYPE_CHECKING:
    from kvtier.engine.engine_core import CommandInbox

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 3600.0
"""Model loading, warm-up and CUDA-graph capture happen before the child reports ready."""
JOIN_TIMEOUT_S = 60.0
FANOUT_CLOSE_TIMEOUT_S = 10.0
"""With several front ends, how long the stopped core waits for its last updates to go out
(`CoreFanout.close`) before it closes the pipes of those that stopped reading."""


@dataclass(frozen=True)
class EngineProcessSpec:
    """Everything the child needs to build its engine and core (all of it pickles)."""

    config: EngineConfig
    request_timeout_s: float | None = None
    log_stats_interval_s: float | None = None
    log_level: int = logging.WARNING
    log_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Ready:
    model_name: str
    max_model_len: int
    sampling_defaults: SamplingDefaults


@dataclass(frozen=True)
class StartFailed:
    message: str
    error: BaseException | None
    """The construction error itself when it pickles."""


class EngineProcessError(RuntimeError):
    """The engine process failed to start (the message carries the child's error)."""


class EngineClient:
    """A front end's end of the engine process's pipe: the handshake, commands out, updates
    in. With several front ends (`kvtier serve --api-server-count`) each has its own."""

    def __init__(self, conn: Connection | None = None) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._ended = False

    def start(self) -> tuple[Ready, CoreUpdate]:
        """Wait until the engine is built; returns its identity and first snapshot. Raises
        the construction error (or EngineProcessError) if it failed."""
        return self._handshake()

    def _handshake(self) -> tuple[Ready, CoreUpdate]:
        conn = self._conn
        assert conn is not None
        try:
            if not conn.poll(START_TIMEOUT_S):
                raise EngineProcessError("the engine process did not start in time")
            first = conn.recv()
            if isinstance(first, StartFailed):
                raise first.error or EngineProcessError(first.message)
            update = conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineProcessError(
                f"the engine process exited during start-up ({self.exit_status()}); see "
                "its log above") from exc
        except BaseException:
            self.close()
            raise
        assert isinstance(first, Ready) and isinstance(update, CoreUpdate)
        return first, update

    def exit_status(self) -> str:
        return "its pipe closed"

    @property
    def is_alive(self) -> bool:
        return self._conn is not None and not self._ended

    def send(self, command: Command | StopCore) -> bool:
        """False if the child is gone (its updates end, and the front end fails what is live)."""
        if self._conn is None:
            return False
        try:
            with self._send_lock:
                self._conn.send(command)
        except (OSError, ValueError):
            return False
        return True

    def updates(self) -> Iterator[CoreUpdate]:
        """The child's updates until its last (closed) one, or until it dies."""
        assert self._conn is not None
        try:
            while True:
                try:
                    update = self._conn.recv()
                except (EOFError, OSError):
                    return
                yield update
                if update.closed:
                    return
        finally:
            self._ended = True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class EngineProcess(EngineClient):
    """Parent side: spawn the child and be its only front end."""

    def __init__(self, spec: EngineProcessSpec) -> None:
        super().__init__()
        self.spec = spec
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self) -> tuple[Ready, CoreUpdate]:
        self._process, (self._conn,) = spawn_engine_process(self.spec, 1)
        return self._handshake()

    def exit_status(self) -> str:
        assert self._process is not None
        return f"exit code {self._process.exitcode}"

    @property
    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def close(self) -> None:
        """Close the pipe, then wait for the child to exit (kill it if it does not). Closed
        first: a child that has not sent its last update (a signal during start-up) then
        stops as soon as it reads the pipe's end, instead of at the join's timeout."""
        super().close()
        if self._process is not None:
            join_engine_process(self._process)


def spawn_engine_process(spec: EngineProcessSpec, num_front_ends: int
                         ) -> tuple[multiprocessing.process.BaseProcess, list[Connection]]:
    """Start the engine process with one pipe per front end; returns the front ends' ends,
    each of which gets the handshake (`Ready`, or `StartFailed`, then the first update)."""
    context = multiprocessing.get_context("spawn")
    pairs = [context.Pipe() for _ in range(num_front_ends)]
    process = context.Process(target=run_engine_process,
                              args=(spec, [child for _, child in pairs]),
                              name="kvtier-engine", daemon=True)
    process.start()
    for _, child in pairs:
        child.close()
    return process, [parent for parent, _ in pairs]


def join_engine_process(process: multiprocessing.process.BaseProcess) -> None:
    """Wait for the engine process to exit; kill it if it does not."""
    process.join(JOIN_TIMEOUT_S)
    if process.is_alive():
        logger.error("the engine process did not exit; killing it")
        process.kill()
        process.join()


def run_engine_process(spec: EngineProcessSpec, conns: list[Connection]) -> None:
    """The child's main: build the engine, then run the core until stopped or orphaned.
    `conns`: one pipe per front end; the core stops once every front end has stopped."""
    # The core's modules load here, in the child: the front ends import this module for
    # EngineClient and never need torch or the model's code.
    from kvtier.engine.core_fanout import CoreFanout
    from kvtier.engine.engine import LLMEngine
    from kvtier.engine.engine_core import CommandInbox, EngineCore

    for sig in (signal.SIGINT, signal.SIGTERM):  # the front ends stop it (module docstring)
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, format=spec.log_format)
    # The pipes' readers hand each command to the core's loop, and the tier's threads their
    # copies: at the default interval each hand-over may wait 5 ms for the GIL (utils/gil.py).
    shorten_switch_interval()
    name_os_threads("kvtier-engine")  # per-thread tools then tell the core from its helpers
    try:
        profile_dir = engine_profile_dir()  # a bad value fails the start, not the first step
        engine = LLMEngine(spec.config)
        engine.log_stats_interval_s = spec.log_stats_interval_s
    except BaseException as exc:
        if isinstance(exc, (ConfigError, ModelLoadError)):
            # A bad argument: its message says it all, and the front end prints it once.
            logger.debug("engine construction failed", exc_info=True)
        else:
            logger.exception("engine construction failed")
        failed = StartFailed(f"{type(exc).__name__}: {exc}", _picklable(exc))
        for conn in conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(failed)
            conn.close()
        return
    frozen = freeze_startup_heap()
    log_long_gc_pauses(role="engine core")
    logger.info("gc: froze %d start-up objects", frozen)
    inbox = CommandInbox()
    fanout = CoreFanout(conns, inbox) if len(conns) > 1 else None
    core = EngineCore(engine, inbox, _sender(conns[0]) if fanout is None else fanout.emit,
                      request_timeout_s=spec.request_timeout_s,
                      separate_process=True, overlap_outputs=spec.config.overlap_outputs,
                      async_scheduling=engine.async_scheduling)
    ready, first = Ready(engine.model_name, engine.max_model_len,
                         engine.sampling_defaults), core.initial_update()
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):  # a front end that died meanwhile
            conn.send(ready)
            conn.send(first)
    if fanout is None:
        threading.Thread(target=_read_commands, args=(conns[0], inbox), name="kvtier-commands",
                         daemon=True).start()
    else:
        fanout.start_readers()
    try:
        with profiled(profile_dir, "engine"):
            core.run()
    finally:
        if fanout is not None and not fanout.close(FANOUT_CLOSE_TIMEOUT_S):
            logger.warning("a front end stopped reading: its last updates were not sent")
        for conn in conns:
            conn.close()


def _sender(conn: Connection) -> Callable[[CoreUpdate], None]:
    """The one front end's emit. A front end that is gone (closed its pipe during start-up,
    or died) has nobody to tell: the core stops on the pipe's end (`_read_commands`), and
    its last update must not fail the core with BrokenPipeError."""
    def send(update: CoreUpdate) -> None:
        with contextlib.suppress(OSError, ValueError):
            conn.send(update)
    return send


def _read_commands(conn: Connection, inbox: CommandInbox) -> None:
    """Child side: move commands from the pipe to the inbox; a closed pipe means stop."""
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            inbox.stop()
            return
        if isinstance(command, StopCore):
            inbox.stop()
            return
        inbox.put(command)


def _picklable(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc
