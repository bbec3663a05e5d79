"""How `kvtier serve` configures uvicorn: uvloop's event loop and httptools' parser (both
dependencies, as in vLLM), which cut the front end's CPU per streamed token by 13-21% against
asyncio + h11 on simulated-device S runs (BENCHMARKS.md, eighteenth-session CPU checks)."""

from __future__ import annotations

import asyncio

import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvtier.server.launch import uvicorn_config


async def _app(scope: dict, receive: object, send: object) -> None:
    """An ASGI app that is never called: only the configuration is under test."""


def test_the_server_runs_on_uvloop_and_httptools() -> None:
    config = uvicorn_config(_app, "127.0.0.1", 0)
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
