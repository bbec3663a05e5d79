"""Start, health-check and tear down one server configuration as a subprocess.

The lab never imports the engine: a kvtier configuration runs `python -m kvtier.cli serve` (the
same interpreter, so the same install) on a free 127.0.0.1 port; a `launch` configuration runs
its command template (e.g. `vllm serve {model} --port {port}`) through the shell; a `base_url`
configuration is used as is. Started servers get their own process group, so teardown (SIGTERM,
then SIGKILL after a grace period) reaches a launcher's children too, and only them. Output goes
to a log file that the report links, and whose tail explains a failed start.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from kvtier.lab.experiment import ServerSpec

HOST = "127.0.0.1"
TERM_GRACE_S = 20.0


class ServerStartError(RuntimeError):
    """The server exited or never became healthy; the message holds its log tail."""


@dataclass
class RunningServer:
    """A reachable server: its URL, and the process and log when the lab started it."""

    spec: ServerSpec
    base_url: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    start_seconds: float = 0.0
    """From launch to the first healthy answer (0 for a given base_url)."""


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the OS picks it; tiny race until the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_command(spec: ServerSpec, port: int) -> list[str]:
    """The argv (kvtier) or shell command (launch) that starts `spec` on `port`."""
    if spec.kind == "launch":
        assert spec.launch is not None
        command = spec.launch.format(host=HOST, port=port, model=spec.model or "")
        return ["/bin/sh", "-c", command]
    model = ["--model", spec.model] if spec.model else []
    return [sys.executable, "-m", "kvtier.cli", "serve", *model, *spec.engine,
            "--host", HOST, "--port", str(port)]


def log_tail(path: Path | None, num_lines: int = 25) -> str:
    if path is None or not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-num_lines:])


@contextlib.contextmanager
def running_server(spec: ServerSpec, log_dir: Path,
                   log_name: str | None = None) -> Iterator[RunningServer]:
    """Yield a healthy server for `spec`; tear it down on exit (even on errors/Ctrl-C).

    The log is `log_dir/<slug of log_name or the server name>.log`.
    """
    if spec.kind == "url":
        assert spec.base_url is not None
        yield RunningServer(spec, spec.base_url.rstrip("/"))
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{slug(log_name or spec.name)}.log"
    port = free_port()
    command = server_command(spec, port)
    with log_path.open("wb") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **spec.env},
                                   start_new_session=True)
        server = RunningServer(spec, f"http://{HOST}:{port}", process, log_path)
        try:
            wait_healthy(server, log)
            server.start_seconds = time.perf_counter() - start
            yield server
        finally:
            stop_process(process)


def wait_healthy(server: RunningServer, log: IO[bytes] | None = None) -> None:
    """Poll the health path until it answers 200; raise ServerStartError on exit or timeout."""
    spec, process = server.spec, server.process
    url = server.base_url + spec.health_path
    deadline = time.perf_counter() + spec.startup_timeout_s
    with httpx.Client(timeout=5.0) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise ServerStartError(f"server {spec.name!r} exited with code "
                                       f"{process.returncode} before it was healthy; log "
                                       f"{server.log_path}:\n{_flush_tail(server, log)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            if time.perf_counter() > deadline:
                raise ServerStartError(f"server {spec.name!r} not healthy at {url} after "
                                       f"{spec.startup_timeout_s:.0f} s; log {server.log_path}:"
                                       f"\n{_flush_tail(server, log)}")
            time.sleep(0.5)


def _flush_tail(server: RunningServer, log: IO[bytes] | None) -> str:
    if log is not None:
        log.flush()
    return log_tail(server.log_path)


def stop_process(process: subprocess.Popen[bytes], grace_s: float = TERM_GRACE_S) -> int | None:
    """SIGTERM the process group we created, SIGKILL it after `grace_s`; the exit code."""
    if process.poll() is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except KeyboardInterrupt:
        # a second Ctrl-C during the grace period: the server is in its own session, so no
        # SIGINT reaches it; kill it now rather than leave it running, then keep unwinding
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.wait(timeout=10)


def scrape_gauge(base_url: str, name: str) -> float | None:
    """A sample's current value from /metrics (e.g. kvtier:kv_cache_total_blocks): the one
    keyed `name` exactly, else the sum of the series named `name` whatever their labels
    (kvtier's, as vLLM's, carry `model_name`); None when there is none."""
    from kvtier.bench.prometheus import parse_metrics_text
    from kvtier.lab.server_stats import split_key

    try:
        response = httpx.get(base_url + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        samples = parse_metrics_text(response.text)
    except ValueError:
        return None
    if name in samples:
        return samples[name]
    matching = [value for key, value in samples.items() if split_key(key)[0] == name]
    return sum(matching) if matching else None


def slug(name: str) -> str:
    """A file-name-safe version of a configuration or workload name."""
    kept = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.strip().lower())
    return "-".join(part for part in kept.split("-") if part) or "server"
