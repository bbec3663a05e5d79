"""A local redis-server process for the redis tier's tests and benchmarks: on a unix socket in
its own directory (no port to collide on), persistence off."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


@dataclass
class RedisServer:
    """A redis-server process on a unix socket in its own directory (no port to collide on),
    persistence off. `url` is what a redis tier takes."""

    process: subprocess.Popen
    socket: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @classmethod
    def start(cls, directory: Path) -> RedisServer:
        """Start one in `directory` and return once it accepts connections."""
        socket = directory / "redis.sock"
        process = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(socket), "--unixsocketperm",
             "700", "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10.0
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"redis-server did not start (exit {process.poll()})")
            time.sleep(0.02)
        return cls(process, socket)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
