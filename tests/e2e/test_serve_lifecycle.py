"""`kvtier serve`'s life around its engine process: a signal while the engine is still
starting, and an engine process that dies while the server serves."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest

from tests.e2e.test_server import ENGINE_FLAGS, spawned_children

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
