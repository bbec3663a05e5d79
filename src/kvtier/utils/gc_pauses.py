"""The garbage collector of the engine core and the HTTP front ends: freeze what start-up
built, log long pauses, move a front end's full passes to its idle moments, and keep the
collector out of CUDA graph capture.

A full collection walks every object the collector tracks, and it stops the engine core's
thread (or a front end's event loop) while it does: every running request waits. After
start-up most of those objects are torch, the model, the tokenizer and the app, which live
until the process exits. Freezing them (as vLLM's engine core and API server do once they
have started) leaves later full passes only what serving created. Passes of LONG_GC_PAUSE_S or
more are logged, so a stall in a latency tail can be told apart from a slow step.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

LONG_GC_PAUSE_S = 0.005

# CPython's generational collector (to 3.13) runs a full pass after 10 middle-generation
# passes once the objects promoted since the last one reach a quarter of the old generation.
# A front end serving ~1,000 streams promotes each request's ~200 tracked objects
# (coroutines, closures, uvicorn's protocol and transport) and met that every ~1 s on S, each
# pass walking them all for 13-107 ms on the card (nvidia-h200) while every stream waited;
# none collected anything. Deferred, a full pass under continuous load comes only after this
# many middle passes (minutes apart).
DEFERRED_FULL_PASS_AFTER = 1_000
# An idle front end catches up after as many middle passes as CPython's default asks for.
IDLE_FULL_PASS_AFTER = 10
IDLE_CHECK_INTERVAL_S = 1.0


def freeze_startup_heap() -> int:
    """Collect start-up garbage, then move every surviving object to the permanent generation
    (never scanned again); returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def defer_full_collections(after_middle_passes: int = DEFERRED_FULL_PASS_AFTER) -> None:
    """Raise the old generation's threshold: CPython then starts a full pass only after
    `after_middle_passes` middle-generation passes (the young thresholds stay)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, after_middle_passes)


async def collect_when_idle(is_idle: Callable[[], bool], *,
                            interval_s: float = IDLE_CHECK_INTERVAL_S,
                            after_middle_passes: int = IDLE_FULL_PASS_AFTER) -> None:
    """Run forever on the event loop: every `interval_s`, if `after_middle_passes` middle
    passes have run since the last full one and `is_idle()`, run a full pass now, while no
    request waits for it. With `defer_full_collections` this keeps the old generation's
    cyclic garbage bounded on any server that is ever idle."""
    while True:
        await asyncio.sleep(interval_s)
        if gc.get_count()[2] >= after_middle_passes and is_idle():
            gc.collect()


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
    """A `gc.callbacks` hook that logs collections lasting `threshold_s` or more, naming the
    process's `role` (the engine core and the front ends share one log)."""

    def __init__(self, threshold_s: float = LONG_GC_PAUSE_S, role: str = "") -> None:
        self.threshold_s = threshold_s
        self.role = role
        self.num_long_pauses = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._started
        if elapsed >= self.threshold_s:
            self.num_long_pauses += 1
            logger.info("gc: generation %d pass took %.1f ms (%d objects collected%s)",
                        info.get("generation", -1), elapsed * 1e3, info.get("collected", 0),
                        f"; {self.role}" if self.role else "")


def log_long_gc_pauses(threshold_s: float = LONG_GC_PAUSE_S, role: str = "") -> GCPauseLog:
    """Install a `GCPauseLog` for this process; returns it (remove it from `gc.callbacks`
    to stop)."""
    hook = GCPauseLog(threshold_s, role)
    gc.callbacks.append(hook)
    return hook
