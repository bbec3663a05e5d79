"""`kvtier serve`: build the engine, serve the app with uvicorn, drain on SIGTERM/SIGINT.

Shutdown order on the first signal:
  1. stop listening (new connections are refused; requests on open connections get 503);
  2. let in-flight requests finish for up to --shutdown-timeout, then abort the rest (their
     streams end with an error event and `data: [DONE]`, non-streaming ones get 503);
  3. shut the engine process down (tiers flush), then let uvicorn close the connections.
The process then exits 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from kvtier.config import ConfigError, EngineConfig
from kvtier.engine.args import engine_kwargs
from kvtier.engine.async_engine import AsyncEngine
from kvtier.engine.engine_process import EngineProcessSpec
from kvtier.model.chat_template import check_chat_template, read_chat_template
from kvtier.server.api_servers import bind_listening_sockets, run_api_servers, say
from kvtier.server.app import ServerSettings, create_app
from kvtier.server.args import cors_list
from kvtier.utils.gc_pauses import (
    collect_when_idle,
    defer_full_collections,
    freeze_startup_heap,
    log_long_gc_pauses,
)
from kvtier.utils.gil import shorten_switch_interval
from kvtier.utils.thread_names import name_os_threads

STATS_LOG_INTERVAL_S = 5.0
"""How often the server logs its engine's throughput (at INFO)."""
ENGINE_WATCH_S = 0.5
"""How often a front end checks that its engine still runs (vLLM's watchdog: 5 s)."""
logger = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with our drain on the first signal instead of an immediate stop.

    uvicorn re-raises captured signals after serving (so the process would die of SIGTERM);
    handling them here instead lets a drained shutdown exit 0.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine,
                 shutdown_timeout_s: float, on_ready: ReadyCallback) -> None:
        super().__init__(config)
        self.async_engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self.on_ready = on_ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._idle_collector: asyncio.Task[None] | None = None
        self._engine_watch: asyncio.Task[None] | None = None
        self.engine_died = False
        """The engine stopped unasked (its process died): the server stopped, exit 1."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.started and not self.should_exit:
            # uvicorn holds a task per request being answered: none means no stream waits.
            self._idle_collector = asyncio.ensure_future(
                collect_when_idle(lambda: not self.server_state.tasks))
            self._engine_watch = asyncio.ensure_future(self._watch_engine())
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_ready(host, port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for task in (self._idle_collector, self._engine_watch):
            if task is not None:
                task.cancel()
        await super().shutdown(sockets)

    async def _watch_engine(self) -> None:
        """Stop serving once the engine is gone unasked: /health's 503 alone left a process
        that a supervisor (systemd, the lab) never restarts, as vLLM's API server exits."""
        while self._drain_task is None:  # a drain stops the engine itself
            if not self.async_engine.is_alive:
                say(f"kvtier serve: the engine stopped unexpectedly "
                    f"({self.async_engine.exit_status()}); stopping the server")
                self.engine_died = True
                self.should_exit = True
                return
            await asyncio.sleep(ENGINE_WATCH_S)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:  # still starting: nothing in flight yet
            self.should_exit = True
            return
        if self._drain_task is not None:
            if sig == signal.SIGINT:  # impatient second Ctrl-C
                self.should_exit = self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain(sig))

    async def _drain(self, sig: int) -> None:
        say(f"kvtier serve: {signal.Signals(sig).name}: draining in-flight requests (up to "
            f"{self.shutdown_timeout_s:g}s)")
        for server in self.servers:
            server.close()
        try:
            await self.async_engine.shutdown(drain=True, timeout_s=self.shutdown_timeout_s)
        finally:
            self.should_exit = True


ReadyCallback = Callable[[str, int], None]
"""Called with the bound host and port once the server accepts connections."""


def _chat_template(value: str | None) -> str | None:
    """`--chat-template`'s template, read and checked before the engine loads."""
    if value is None:
        return None
    try:
        template = read_chat_template(value)
        check_chat_template(template)
    except ValueError as exc:  # ChatTemplateError is one
        raise ConfigError(f"--chat-template: {exc}") from None
    return template


def _tool_call_parser(args: argparse.Namespace) -> str | None:
    """The parser tool calls are read with: the two flags go together (as in vLLM)."""
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        raise ConfigError("--enable-auto-tool-choice and --tool-call-parser go together: "
                          "give both (e.g. --enable-auto-tool-choice --tool-call-parser "
                          "hermes) or neither")
    return args.tool_call_parser


def run_server(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    settings = ServerSettings(
        served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key or os.environ.get("KVTIER_API_KEY") or None,
        max_request_body_bytes=args.max_request_body_bytes,
        chat_template=_chat_template(args.chat_template),
        tool_call_parser=_tool_call_parser(args),
        reasoning_parser=args.reasoning_parser,
        allowed_origins=cors_list(args.allowed_origins),
        allowed_methods=cors_list(args.allowed_methods),
        allowed_headers=cors_list(args.allowed_headers),
        allow_credentials=args.allow_credentials)
    spec = EngineProcessSpec(config, request_timeout_s=args.request_timeout,
                             log_stats_interval_s=STATS_LOG_INTERVAL_S,
                             log_level=logging.getLogger().level)
    # Listen before the engine starts (as vLLM does): an address taken or unknown is then a
    # usage error, not a model load followed by uvicorn's exit.
    try:
        sockets = bind_listening_sockets(args.host, args.port, args.api_server_count)
    except (OSError, OverflowError) as exc:
        raise ConfigError(f"cannot listen on --host {args.host} --port {args.port}: "
                          f"{exc}") from None
    try:
        if args.api_server_count > 1:
            return run_api_servers(spec, settings, sockets,
                                   max_waiting_requests=args.max_waiting_requests,
                                   shutdown_timeout_s=args.shutdown_timeout)
        engine = AsyncEngine.from_spec(spec, max_waiting_requests=args.max_waiting_requests)
        _start(engine)

        def announce(host: str, port: int) -> None:
            say(f"kvtier serve: ready on http://{host}:{port} (model {engine.model_name}, "
                f"max_model_len {engine.max_model_len})")

        started = _serve(engine, settings, args.shutdown_timeout, announce, sockets=sockets)
    finally:
        for sock in set(sockets):
            sock.close()
    if not started:
        return 1
    say("kvtier serve: stopped")
    return 0


def serve_front_end(conn: Connection, spec: EngineProcessSpec, settings: ServerSettings, *,
                    sock: socket.socket, max_waiting_requests: int | None,
                    shutdown_timeout_s: float, on_ready: Callable[[str, int], None],
                    report_start_error: bool = True) -> int:
    """One of `--api-server-count` front ends: serve on `sock` through the engine process's
    pipe `conn`; `on_ready(model_name, max_model_len)` once serving. Every front end gets
    the engine's start-up error; `report_start_error` says whether this one prints it. The
    exit code: 2 for an argument the engine refused, else 1 if it did not serve."""
    engine = AsyncEngine.attach(conn, spec, max_waiting_requests=max_waiting_requests)
    try:
        _start(engine)
    except (ValueError, FileNotFoundError) as exc:  # a bad argument, as `kvtier.cli.main` has it
        if report_start_error:
            say(f"kvtier serve: error: {exc}")
        return 2
    except Exception as exc:  # the engine process logged the traceback
        if report_start_error:
            say(f"kvtier serve: the engine did not start: {type(exc).__name__}: {exc}")
        return 1
    started = _serve(engine, settings, shutdown_timeout_s,
                     lambda host, port: on_ready(engine.model_name, engine.max_model_len),
                     sockets=[sock])
    return 0 if started else 1


def _start(engine: AsyncEngine) -> None:
    """Start the engine (a signal meanwhile just leaves: nothing is in flight yet)."""
    # The engine runs in its own process; here the event loop shares the GIL with the thread
    # that dispatches the engine's updates: at the default switch interval a step's tokens
    # could wait 5 ms behind HTTP work.
    shorten_switch_interval()
    # Per-thread tools (top -H, py-spy, the lab's CPU record) then tell its event loop from
    # the engine's update dispatcher and the tokenizer pool.
    name_os_threads("kvtier-api")
    previous = {sig: signal.signal(sig, _exit_now) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        engine.start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(engine: AsyncEngine, settings: ServerSettings, shutdown_timeout_s: float,
           on_ready: ReadyCallback, *, host: str = "127.0.0.1", port: int = 0,
           sockets: list[socket.socket] | None = None) -> bool:
    """Serve the app until drained; whether uvicorn started and the engine did not die."""
    app = create_app(engine, settings)
    # What start-up built (torch, the tokenizer, the app) lives as long as the process. Frozen,
    # the collector's full passes stop walking it: unfrozen, each took 0.2-0.4 s of the event
    # loop on the 2-core box while every stream waited. vLLM's API server freezes it too.
    logger.info("gc: froze %d start-up objects (front end)", freeze_startup_heap())
    # What serving creates, the streams in flight, outlives the young passes; CPython's full
    # passes over it stalled every stream for up to 107 ms a second on S. They wait for an
    # idle moment instead (`_DrainingServer.startup`).
    defer_full_collections()
    logger.info("gc: full passes wait for an idle moment (or %d middle passes) (front end)",
                gc.get_threshold()[2])
    log_long_gc_pauses(role="front end")
    server = _DrainingServer(uvicorn_config(app, host, port), engine, shutdown_timeout_s,
                             on_ready)
    try:
        server.run(sockets=sockets)
    finally:
        if engine.is_alive:  # uvicorn failed to start or stopped on its own: abort what is left
            asyncio.run(engine.shutdown(drain=False))
    return server.started and not server.engine_died


def uvicorn_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    """How uvicorn serves the app. `auto` is uvloop's event loop and httptools' parser where
    installed (dependencies, as in vLLM), else asyncio's and h11: the front end's CPU per
    streamed token is what caps one API server."""
    return uvicorn.Config(
        app, host=host, port=port, http="auto", loop="auto", ws="none", lifespan="on",
        access_log=False, log_config=None, timeout_graceful_shutdown=5)


def _exit_now(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
