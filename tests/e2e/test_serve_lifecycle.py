"""`kvtier serve`'s life around its engine process: a signal while the engine is still
starting, and an engine process that dies while the server serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_api_servers import server, wait_gone
from tests.e2e.test_server import ENGINE_FLAGS, GREEDY, spawned_children

pytestmark = pytest.mark.slow


def test_sigterm_while_the_engine_starts_exits_at_once() -> None:
    # One API server: SIGTERM while it waits for its engine process to be ready. Before, it
    # waited for the engine's join timeout (60 s), then killed it: the engine, ready by then,
    # kept serving a pipe its front end no longer read.
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "--log-level", "INFO",
                             "serve", *ENGINE_FLAGS, "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        engine = _engine_process(proc)
        # The front end waits for its engine's handshake now; past the moment the spawn
        # hands the child its arguments (a signal within it is Python's to lose).
        time.sleep(0.5)
        proc.terminate()
        started = time.monotonic()
        assert proc.wait(60) == 0
        assert time.monotonic() - started < 30
    finally:
        proc.kill()
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert "ready on" not in stderr, stderr[-2000:]
    assert "did not exit" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    with pytest.raises(FileNotFoundError):  # reaped: no orphan engine
        open(f"/proc/{engine}/stat").close()


def _engine_process(proc: subprocess.Popen[str]) -> int:
    """The engine process's pid, once `proc` has spawned it."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline
        with contextlib.suppress(FileNotFoundError):  # a short-lived child came and went
            children = spawned_children(proc.pid)
            if children:
                [engine] = children
                return engine
        time.sleep(0.01)


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_killed_engine_process_stops_the_server(count: str) -> None:
    # The engine process dies (the OOM killer, a crashed kernel) with a stream in flight: the
    # stream ends with an error and [DONE], and the server exits 1 (as vLLM's API server
    # exits on its engine's death) so that whatever supervises it restarts it. Before, one
    # API server answered /health with 503 for ever and never exited.
    with server("--api-server-count", count) as proc:
        processes = spawned_children(proc.proc.pid)
        engine = min(processes)  # spawned first: before the front ends (several)

        async def scenario() -> str:
            body = {"prompt": "die", "max_tokens": 200, "ignore_eos": True, "stream": True,
                    **GREEDY}
            async with (httpx.AsyncClient(timeout=60) as http,
                        http.stream("POST", f"{proc.url}/v1/completions",
                                    json=body) as response):
                lines = response.aiter_lines()
                text = await anext(lines)  # streaming now
                os.kill(engine, signal.SIGKILL)
                async for line in lines:
                    text += line + "\n"
                return text

        events = [line.removeprefix("data: ") for line in asyncio.run(scenario()).split("\n")
                  if line]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_error", events[-2]
        assert proc.proc.wait(60) == 1, "".join(proc.lines[-30:])
        wait_gone(processes)
        said = "".join(proc.lines)
        assert "stopped unexpectedly" in said and "(exit code -9)" in said, said[-3000:]


@pytest.mark.parametrize("count", ["1", "2"])
def test_sigterm_stops_the_server_after_its_log_reader_left(count: str) -> None:
    # Whoever read stderr is gone (a closed terminal, a log pipe whose reader died). Before,
    # the drain's first line raised BrokenPipeError before the drain began: SIGTERM never
    # stopped the server, and with several API servers nothing stopped at all.
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", *ENGINE_FLAGS,
                             "--port", "0", "--api-server-count", count],
                            stderr=subprocess.PIPE, text=True)
    processes: list[int] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "ready on" in line:
                break
        processes = spawned_children(proc.pid)
        proc.stderr.close()
        proc.terminate()
        assert proc.wait(60) == 0
        wait_gone(processes)
    finally:
        proc.kill()
        for pid in processes:  # still ours only while it runs multiprocessing's spawn_main
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
