"""Engine diagnostics switched on by the environment: a cProfile of the engine core's loop in
a running server, and a per-step trace.

The engine process's host work (scheduling, the tiers' bookkeeping, outputs) is what a served
workload waits for between steps, and an in-process replay does not always show the same
costs: it has no front end, no pipe, and its requests arrive differently. With
KVTIER_ENGINE_PROFILE_DIR set, the engine process profiles its core loop from start to
shutdown (on Python 3.12+ cProfile sees every thread, so the pipe readers' blocking reads show
up as `posix.read` and lock waits; before 3.12 only the loop's thread) and writes
`engine-<pid>.prof` (pstats format) there when the loop ends, like vLLM's
VLLM_TORCH_PROFILER_DIR for the host side. cProfile roughly doubles Python's cost: compare
profiles with each other, not with unprofiled timings.

With KVTIER_STEP_TRACE naming a file, the engine appends one JSON line per step: when its
tokens were read (`time.perf_counter` seconds), its kind (prompt tokens, decodes only, or
nothing), rows, decode rows, tokens and its launch-to-tokens time in ms (with tiers, also the
loads finished and the stores started since the line before). Averages hide what
a latency tail is made of; the trace shows, for instance, how many prompt steps in a row a
decoding stream waited through (`utils/step_trace.py` reads it, `scripts/step_trace_summary.py`
prints it).
"""

from __future__ import annotations

import contextlib
import cProfile
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

logger = logging.getLogger(__name__)

ENGINE_PROFILE_ENV = "KVTIER_ENGINE_PROFILE_DIR"


def engine_profile_dir() -> Path | None:
    """The directory KVTIER_ENGINE_PROFILE_DIR names, created; None when it is unset or empty.
    Raises ValueError naming the variable when the directory cannot be made."""
    value = os.environ.get(ENGINE_PROFILE_ENV)
    if not value:
        return None
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{ENGINE_PROFILE_ENV}={value!r}: cannot create the directory "
                         f"({exc.strerror})") from exc
    return path


@contextlib.contextmanager
def profiled(directory: Path | None, name: str) -> Iterator[None]:
    """Profile the body into `directory`/`name`-<pid>.prof (nothing when `directory` is None);
    the file is written however the body ends."""
    if directory is None:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        path = directory / f"{name}-{os.getpid()}.prof"
        profiler.dump_stats(path)
        logger.info("profile of the %s written to %s", name, path)


STEP_TRACE_ENV = "KVTIER_STEP_TRACE"


def open_step_trace() -> TextIO | None:
    """The file KVTIER_STEP_TRACE names, opened for appending one JSON line per engine step
    (line-buffered, so a killed server keeps what it wrote); None when the variable is unset
    or empty. Raises ValueError naming the variable when the file cannot be opened."""
    value = os.environ.get(STEP_TRACE_ENV)
    if not value:
        return None
    try:
        return open(value, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - engine-owned
    except OSError as exc:
        raise ValueError(f"{STEP_TRACE_ENV}={value!r}: cannot open the file "
                         f"({exc.strerror})") from exc
