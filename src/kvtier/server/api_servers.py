"""`kvtier serve --api-server-count N`: one engine process, N HTTP front ends on one socket.

    this process (supervisor)             api server 0 ─┐               ┌─ engine process
      binds a listening socket each ────► api server 1 ─┼── pipe each ──┤  (one core, its
      forwards SIGTERM/SIGINT             ...           ┘               └   fan-out)

One front end's event loop parses, tokenises and streams every request; a fast engine
outruns it (workload S with async scheduling: streams merged their queued tokens into ever
fewer chunks). As with vLLM's `--api-server-count`, the HTTP work is spread over processes
listening on one address (SO_REUSEPORT: the kernel hands each new connection to one of
them). Each front end sends its requests down its own pipe to the engine process
(`core_fanout`).

Latency histograms live in prometheus_client's multiprocess files, so any front end's
`/metrics` counts every request; counters and gauges come from the engine's snapshot, which
every front end receives. Unless the user names a directory for them (as with vLLM, it is
then theirs to wipe), the supervisor makes `kvtier-metrics-<its pid>-*` in the temporary
directory and removes it when it stops. A supervisor killed outright (SIGKILL) cannot, so
each start first removes the directories whose supervisor is dead.

On the first SIGTERM/SIGINT the supervisor passes SIGTERM on; each front end drains its own
requests and stops, and the engine process stops once the last one has. If a front end or
the engine process dies, the supervisor stops the rest and exits 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import FrameType
from typing import IO

from kvtier.engine.engine_process import (
    EngineProcessSpec,
    join_engine_process,
    spawn_engine_process,
)
from kvtier.server.app import ServerSettings

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048
"""uvicorn's default."""
START_TIMEOUT_S = 3600.0
"""Model loading, warm-up and CUDA-graph capture happen before the front ends are ready."""
POLL_S = 0.2
METRICS_DIR_PREFIX = "kvtier-metrics-"
OWNER_LOCK = ".owner.lock"
"""Inside a metrics directory: flocked by its supervisor while it runs (prometheus_client
reads only the *.db files there)."""
_METRICS_DIR_NAME = re.compile(re.escape(METRICS_DIR_PREFIX) + r"(\d+)-[a-z0-9_]+")
"""A directory `run_api_servers` made: its supervisor's pid, then mkdtemp's random part."""
REFUSED_EXIT_WAIT_S = 10.0
"""How long the supervisor waits for the front ends to exit after one failed to start (each
gets the engine's start-up error), to tell a refused argument (exit code 2) from a crash."""


@dataclass(frozen=True)
class ApiServerSpec:
    """What one front-end process needs (all of it pickles)."""

    index: int
    engine: EngineProcessSpec
    settings: ServerSettings
    max_waiting_requests: int | None
    shutdown_timeout_s: float


@dataclass(frozen=True)
class ApiServerReady:
    index: int
    model_name: str
    max_model_len: int


def say(message: str) -> None:
    """One line of `kvtier serve`'s own on stderr. A reader of stderr that is gone (a closed
    terminal, a dead log pipe) must not stop a shutdown midway: a failed print raised
    BrokenPipeError in the drain, which then never stopped the server. From then on stderr
    goes to /dev/null (Python's advice for a broken stdout), so logging and the exit's
    flush do not fail either."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)


def bind_listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per front end, all on one address (OSError if it is taken).

    With SO_REUSEPORT the kernel spreads new connections over the sockets by a hash of the
    client's address, so a burst of connections is shared out. One socket shared by every
    process would not be: asyncio accepts up to its backlog per wake-up, and a burst of 32
    went to a single front end in two trials of four. Without SO_REUSEPORT (not Linux or
    BSD) the front ends share the one socket.

    A socket of another process on the address (another server's, SO_REUSEPORT or not) is
    an error: the sockets here would join its SO_REUSEPORT group without one, and the
    kernel would split the connections between the two servers.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reuse_port = hasattr(socket, "SO_REUSEPORT") and count > 1
    sockets: list[socket.socket] = []
    if reuse_port:
        port = _free_port(family, host, port)
    try:
        for _ in range(count if reuse_port else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others join the port the first got
            sock.listen(LISTEN_BACKLOG)
    except (OSError, OverflowError):
        for sock in sockets:
            sock.close()
        raise
    return sockets * count if len(sockets) == 1 else sockets


def _free_port(family: socket.AddressFamily, host: str, port: int) -> int:
    """`port` (a free one for 0) once a bind without SO_REUSEPORT shows that nothing listens
    there; OSError (EADDRINUSE) if something does."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        probe.bind((host, port))
        return int(probe.getsockname()[1])


def run_api_servers(spec: EngineProcessSpec, settings: ServerSettings,
                    sockets: list[socket.socket], *, max_waiting_requests: int | None,
                    shutdown_timeout_s: float) -> int:
    """Supervise the engine process and a front end per socket of `sockets` (from
    `bind_listening_sockets`) until they stop; the exit code."""
    count = len(sockets)
    # prometheus_client picks its multiprocess value files at import, from the environment:
    # set before the front ends start (they inherit it), so their histograms are shared. A
    # directory the user chose (as with vLLM) is kept; else a temporary one is made.
    given_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir, owner = (given_dir, None) if given_dir else _new_metrics_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    supervisor = _Supervisor(count)
    try:
        return supervisor.run(spec, settings, sockets, max_waiting_requests, shutdown_timeout_s)
    finally:
        for sock in sockets:  # closed already once the front ends started; this covers a failure
            sock.close()
        if given_dir is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if owner is not None:
                owner.close()


def _new_metrics_dir() -> tuple[str, IO[bytes] | None]:
    """A fresh multiprocess-metrics directory named with this process's id, and its owner
    lock (held until the file is closed), after removing those that killed supervisors
    left."""
    parent = tempfile.gettempdir()
    for stale in remove_stale_metrics_dirs(parent):
        logger.info("removed %s: its kvtier serve process is gone", stale)
    path = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-", dir=parent)
    lock_path = os.path.join(path, OWNER_LOCK)
    try:
        owner = open(lock_path, "wb")  # noqa: SIM115 - held while serving
    except OSError:
        return path, None  # no lock file: the pid in the name tells
    try:
        fcntl.flock(owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without flock: an unheld lock would read as stale
        owner.close()
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        return path, None
    return path, owner


def remove_stale_metrics_dirs(parent: str | Path) -> list[Path]:
    """Remove the metrics directories under `parent` whose supervisor no longer runs, and
    that this user owns; the ones removed. A directory with an owner lock is stale when
    the lock can be taken (the kernel dropped it with its holder, whichever process
    namespace that ran in); one without (its supervisor is creating it, or flock failed
    there) when the pid in its name is not alive. A reused pid keeps a directory too long,
    never loses a live one. Names without a pid (other programs') are left alone."""
    removed = []
    with contextlib.suppress(OSError):
        for path in Path(parent).iterdir():
            match = _METRICS_DIR_NAME.fullmatch(path.name)
            if match is None:
                continue
            with contextlib.suppress(OSError):
                info = path.lstat()  # a link is not followed: never a directory here
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                    continue
                if not _supervisor_gone(path, int(match[1])):
                    continue
                shutil.rmtree(path)
                removed.append(path)
    return removed


def _supervisor_gone(path: Path, pid: int) -> bool:
    try:
        lock = open(path / OWNER_LOCK, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return not _pid_alive(pid)
    with lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held: its supervisor runs
        return True  # closing the file releases the probe's lock


def _pid_alive(pid: int) -> bool:
    """Whether a process of that id exists (one of another user's counts)."""
    if pid <= 0:
        return True  # 0 and negatives name process groups: never judged dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False  # no such pid can exist
    return True


class _Supervisor:
    def __init__(self, count: int) -> None:
        self.count = count
        self._context = multiprocessing.get_context("spawn")
        self._front_ends: list[multiprocessing.process.BaseProcess] = []
        self._engine: multiprocessing.process.BaseProcess | None = None
        self._stopping = False
        self._signals = 0
        self._lifeline: Connection | None = None
        self._refused = False
        """The engine refused an argument: the front ends printed it; exit 2, quietly."""

    def run(self, spec: EngineProcessSpec, settings: ServerSettings,
            sockets: list[socket.socket],
            max_waiting_requests: int | None, shutdown_timeout_s: float) -> int:
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        started = False
        try:
            self._engine, conns = spawn_engine_process(spec, self.count)
            # A pipe per front end to say it serves (a queue would need a lock, and with it
            # multiprocessing's resource-tracker process).
            ready_pipes = [self._context.Pipe(duplex=False) for _ in conns]
            # Only this process holds the lifeline's write end: its reader in every front end
            # sees EOF when this process dies, however it dies (SIGKILL included).
            lifeline, self._lifeline = self._context.Pipe(duplex=False)
            for index, (conn, sock) in enumerate(zip(conns, sockets, strict=True)):
                front_end = self._context.Process(
                    target=run_api_server, name=f"kvtier-api-server-{index}",
                    args=(ApiServerSpec(index, spec, settings, max_waiting_requests,
                                        shutdown_timeout_s), conn, sock,
                          ready_pipes[index][1], lifeline))
                front_end.start()
                self._front_ends.append(front_end)
            # The front ends hold their own copies now. A closed pipe must mean its front
            # end is gone, and once they have all stopped listening, connecting must fail.
            address = sockets[0].getsockname()[:2]
            for conn in conns:
                conn.close()
            for _, ready_writer in ready_pipes:
                ready_writer.close()
            lifeline.close()
            for sock in sockets:
                sock.close()
            started = self._wait_ready([reader for reader, _ in ready_pipes], address)
            if not started:  # a signal during start-up just leaves, as one front end does
                return 0 if self._signals else 2 if self._refused else 1
            return 1 if self._supervise() else 0
        finally:
            self._stop_all(engine_ready=started)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            say(f"kvtier serve: {signal.Signals(sig).name}: draining the API servers")
        # A second SIGINT reaches the front ends as one: they stop at once.
        self._forward(signal.SIGINT if self._signals > 1 and sig == signal.SIGINT
                      else signal.SIGTERM)
        self._stopping = True

    def _forward(self, sig: int) -> None:
        for front_end in self._front_ends:
            if front_end.is_alive() and front_end.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(front_end.pid, sig)

    def _wait_ready(self, ready_readers: list[Connection], address: tuple[str, int]) -> bool:
        """Until every front end serves; False if one died first, or a signal came."""
        ready: list[ApiServerReady] = []
        waiting = list(ready_readers)
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            if self._stopping:
                return False
            failed = any(not p.is_alive() for p in self._front_ends)
            for reader in [] if failed else wait(waiting, POLL_S):
                waiting.remove(reader)  # type: ignore[arg-type]
                try:
                    ready.append(reader.recv())  # type: ignore[union-attr]
                except EOFError:  # it exited before it served
                    failed = True
            if self._stopping:  # a signal came meanwhile (and took the front ends down)
                return False
            if failed or time.monotonic() > deadline:
                if failed and self._front_ends_refused_an_argument():
                    return False
                say("kvtier serve: an API server failed to start; see its log above")
                return False
        host, port = address
        first = ready[0]
        say(f"kvtier serve: ready on http://{host}:{port} (model {first.model_name}, "
            f"max_model_len {first.max_model_len}, {self.count} API servers)")
        return True

    def _front_ends_refused_an_argument(self) -> bool:
        """Whether the front ends exited 2: the engine refused a bad argument, which the
        first of them printed as one line (`serve_front_end`)."""
        deadline = time.monotonic() + REFUSED_EXIT_WAIT_S
        for front_end in self._front_ends:
            front_end.join(max(0.0, deadline - time.monotonic()))
        self._refused = any(p.exitcode == 2 for p in self._front_ends)
        return self._refused

    def _supervise(self) -> bool:
        """Until the front ends have all stopped; True if one, or the engine, died unasked."""
        assert self._engine is not None
        while any(p.is_alive() for p in self._front_ends):
            wait([p.sentinel for p in self._front_ends] + [self._engine.sentinel], POLL_S)
            if self._stopping:
                continue
            dead = [p for p in self._front_ends if not p.is_alive()]
            if dead or not self._engine.is_alive():
                # The engine first: its death also stops every front end (exit code 1).
                what = (f"the engine process (exit code {self._engine.exitcode})"
                        if not self._engine.is_alive()
                        else f"API server {dead[0].name} (exit code {dead[0].exitcode})")
                say(f"kvtier serve: {what} stopped unexpectedly; stopping the rest")
                self._stopping = True
                self._forward(signal.SIGTERM)
                return True
        return False

    def _stop_all(self, engine_ready: bool) -> None:
        """The front ends first (each drains, then tells the engine); then the engine."""
        self._stopping = True
        self._forward(signal.SIGTERM)
        for front_end in self._front_ends:
            front_end.join()
        if self._engine is not None:
            if not engine_ready:  # it may still be loading: nobody waits for it
                self._engine.terminate()
            join_engine_process(self._engine)
        if not self._refused:
            say("kvtier serve: stopped")


def run_api_server(spec: ApiServerSpec, conn: Connection, sock: socket.socket,
                   ready_writer: Connection, lifeline: Connection) -> None:
    """A front end's main: attach to the engine process, serve HTTP on the shared socket."""
    from kvtier.server.launch import serve_front_end

    logging.basicConfig(level=spec.engine.log_level, format=spec.engine.log_format)
    threading.Thread(target=_stop_with_supervisor, args=(lifeline,), name="kvtier-lifeline",
                     daemon=True).start()

    def announce(model_name: str, max_model_len: int) -> None:
        ready_writer.send(ApiServerReady(spec.index, model_name, max_model_len))
        ready_writer.close()

    code = serve_front_end(conn, spec.engine, spec.settings, sock=sock,
                           max_waiting_requests=spec.max_waiting_requests,
                           shutdown_timeout_s=spec.shutdown_timeout_s, on_ready=announce,
                           report_start_error=spec.index == 0)
    sys.exit(code)


def _stop_with_supervisor(lifeline: Connection) -> None:
    """Wait for the supervisor's end of the lifeline to close; then drain and stop as on
    SIGTERM, so that a supervisor killed outright leaves no server behind (the engine
    process stops once every front end has)."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv()
    os.kill(os.getpid(), signal.SIGTERM)
