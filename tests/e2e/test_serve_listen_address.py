"""`kvtier serve` listens before it starts the engine (as vLLM does): an address that is taken
or unknown is one usage error naming --host and --port, exit 2, no engine started. Before,
the engine loaded first and uvicorn then exited 3 with its own log lines (one API server), or
the supervisor exited 1 (several); --port 70000 listened on 4464."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from kvtier.cli import build_parser
from kvtier.server.api_servers import bind_listening_sockets

ENGINE_FLAGS = ["--model", "random:tiny-llama", "--device", "cpu"]


def _serve(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", *ENGINE_FLAGS, *flags],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_port_in_use_is_one_error_before_the_engine_starts(count: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve("--port", str(port), "--api-server-count", count)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"kvtier serve: error: cannot listen on --host 127.0.0.1 --port {port}: "
        "[Errno 98] Address already in use"]


def test_an_unknown_host_is_one_error_naming_it() -> None:
    done = _serve("--host", "no-such-host.invalid", "--port", "0")
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert line.startswith("kvtier serve: error: cannot listen on --host no-such-host.invalid "
                           "--port 0: ")


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_a_port_outside_the_tcp_range_is_a_usage_error(
        port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--port", port])
    assert exited.value.code == 2
    assert f"argument --port: must be in 0..65535, got {port}" in capsys.readouterr().err


def test_the_tcp_range_ends_are_taken() -> None:
    for port in ("0", "65535"):
        assert build_parser().parse_args(["serve", "--port", port]).port == int(port)


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_port_another_server_listens_on_is_in_use(count: str) -> None:
    # Another kvtier (or vLLM) server holds the port with SO_REUSEPORT, as the front ends'
    # sockets are bound. Before, this server's own SO_REUSEPORT sockets joined that group
    # without an error, and the kernel then split the clients' connections between two
    # servers (maybe of two models).
    taken = bind_listening_sockets("127.0.0.1", 0, 2)
    port = taken[0].getsockname()[1]
    try:
        done = _serve("--port", str(port), "--api-server-count", count)
    finally:
        for sock in taken:
            sock.close()
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"kvtier serve: error: cannot listen on --host 127.0.0.1 --port {port}: "
        "[Errno 98] Address already in use"]
