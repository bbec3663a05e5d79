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
import logging
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn

from kvtier.config import EngineConfig
from kvtier.engine.args import engine_kwargs
from kvtier.engine.async_engine import AsyncEngine
from kvtier.server.app import ServerSettings, create_app

STATS_LOG_INTERVAL_S = 5.0
"""How often the server logs its engine's throughput (at INFO)."""
SWITCH_INTERVAL_S = 0.0005

logger = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with our drain on the first signal instead of an immediate stop.

    uvicorn re-raises captured signals after serving (so the process would die of SIGTERM);
    handling them here instead lets a drained shutdown exit 0.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine,
                 shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.async_engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.started and not self.should_exit:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"kvtier serve: ready on http://{host}:{port} (model "
                  f"{self.async_engine.model_name}, max_model_len "
                  f"{self.async_engine.max_model_len})", file=sys.stderr, flush=True)

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
        print(f"kvtier serve: {signal.Signals(sig).name}: draining in-flight requests (up to "
              f"{self.shutdown_timeout_s:g}s)", file=sys.stderr, flush=True)
        for server in self.servers:
            server.close()
        try:
            await self.async_engine.shutdown(drain=True, timeout_s=self.shutdown_timeout_s)
        finally:
            self.should_exit = True


def run_server(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    # The engine runs in its own process; here the event loop shares the GIL with the thread
    # that dispatches the engine's updates. At Python's default 5 ms switch interval a step's
    # tokens could wait that long behind HTTP work; 0.5 ms keeps the hand-over under a step.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    settings = ServerSettings(
        served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key or os.environ.get("KVTIER_API_KEY") or None,
        max_request_body_bytes=args.max_request_body_bytes)
    # A signal while the model loads: nothing is in flight, so just leave.
    previous = {sig: signal.signal(sig, _exit_now) for sig in (signal.SIGTERM, signal.SIGINT)}
    engine = AsyncEngine.spawn(config, max_waiting_requests=args.max_waiting_requests,
                               request_timeout_s=args.request_timeout,
                               log_stats_interval_s=STATS_LOG_INTERVAL_S)
    engine.start()
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    app = create_app(engine, settings)
    uvicorn_config = uvicorn.Config(
        app, host=args.host, port=args.port, http="h11", ws="none", lifespan="on",
        access_log=False, log_config=None, timeout_graceful_shutdown=5)
    server = _DrainingServer(uvicorn_config, engine, args.shutdown_timeout)
    try:
        server.run()
    finally:
        if engine.is_alive:  # uvicorn failed to start or stopped on its own: abort what is left
            asyncio.run(engine.shutdown(drain=False))
    if not server.started:
        return 1
    print("kvtier serve: stopped", file=sys.stderr, flush=True)
    return 0


def _exit_now(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
