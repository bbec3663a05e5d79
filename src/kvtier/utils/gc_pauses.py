"""The garbage collector of the engine core and the HTTP front ends: freeze what start-up
built, log long pauses, and keep it out of CUDA graph capture.

A full collection walks every object the collector tracks, and it stops the engine core's
thread (or a front end's event loop) while it does: every running request waits. After
start-up most of those objects are torch, the model, the tokenizer and the app, which live
until the process exits. Freezing them (as vLLM's engine core and API server do once they
have started) leaves later full passes only what serving created. Passes of LONG_GC_PAUSE_S or
more are logged, so a stall in a latency tail can be told apart from a slow step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

LONG_GC_PAUSE_S = 0.005


def freeze_startup_heap() -> int:
    """Collect start-up garbage, then move every surviving object to the permanent generation
    (never scanned again); returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Collect now, then keep the collector off until the block ends (its earlier state is
    restored). CUDA graph capture runs inside one. A collection during capture frees whatever
    unreachable cycles hold, such as an earlier engine's pinned buffers and events, and a CUDA
    free or event call from the capturing thread invalidates the capture. SGLang and vLLM
    also keep the collector out of capture, which also makes capture faster."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class GCPauseLog:
    """A `gc.callbacks` hook that logs collections lasting `threshold_s` or more."""

    def __init__(self, threshold_s: float = LONG_GC_PAUSE_S) -> None:
        self.threshold_s = threshold_s
        self.num_long_pauses = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._started
        if elapsed >= self.threshold_s:
            self.num_long_pauses += 1
            logger.info("gc: generation %d pass took %.1f ms (%d objects collected)",
                        info.get("generation", -1), elapsed * 1e3, info.get("collected", 0))


def log_long_gc_pauses(threshold_s: float = LONG_GC_PAUSE_S) -> GCPauseLog:
    """Install a `GCPauseLog` for this process; returns it (remove it from `gc.callbacks`
    to stop)."""
    hook = GCPauseLog(threshold_s)
    gc.callbacks.append(hook)
    return hook
