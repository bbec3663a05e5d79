"""The collector's set-up in the engine core and the front ends: start-up objects frozen,
long collections logged, a front end's full passes moved to its idle moments."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from kvtier.utils.gc_pauses import (
    DEFERRED_FULL_PASS_AFTER,
    GCPauseLog,
    collect_when_idle,
    collector_paused,
    defer_full_collections,
    freeze_startup_heap,
    log_long_gc_pauses,
)


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_freeze_moves_live_objects_out_of_collection(unfrozen: None) -> None:
    survivor = [[i] for i in range(1000)]
    frozen = freeze_startup_heap()
    # A frozen object that dies leaves the permanent generation: in a process whose other
    # threads (earlier tests' daemons) free objects, the count may fall a little after the
    # call, never rise.
    assert frozen >= gc.get_freeze_count() >= max(len(survivor), frozen - 1000)
    assert not any(obj is survivor for obj in gc.get_objects())  # no generation scans it


def test_a_pass_over_the_threshold_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    hook = log_long_gc_pauses(threshold_s=0.0)
    try:
        with caplog.at_level(logging.INFO, logger="kvtier.utils.gc_pauses"):
            gc.collect(1)
    finally:
        gc.callbacks.remove(hook)
    assert hook.num_long_pauses == 1
    assert "gc: generation 1 pass took" in caplog.text


def test_a_logged_pass_names_the_processs_role(caplog: pytest.LogCaptureFixture) -> None:
    hook = GCPauseLog(threshold_s=0.0, role="front end")
    with caplog.at_level(logging.INFO, logger="kvtier.utils.gc_pauses"):
        hook("start", {"generation": 2})
        hook("stop", {"generation": 2, "collected": 7})
    assert "gc: generation 2 pass took" in caplog.text
    assert "(7 objects collected; front end)" in caplog.text


@pytest.fixture
def thresholds():
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_deferring_raises_only_the_old_generations_threshold(thresholds: None) -> None:
    gc.set_threshold(700, 10, 10)
    defer_full_collections()
    assert gc.get_threshold() == (700, 10, DEFERRED_FULL_PASS_AFTER)


def _full_passes_while(body) -> int:
    """How many full (generation 2) passes ran while `body()` ran."""
    passes = []

    def hook(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            passes.append(info)

    gc.callbacks.append(hook)
    try:
        body()
    finally:
        gc.callbacks.remove(hook)
    return len(passes)


def test_an_idle_check_runs_a_full_pass_only_when_idle_and_due(thresholds: None) -> None:
    defer_full_collections()  # no automatic full pass meanwhile
    idle = [False]
    _Cycle.freed.clear()

    async def serve_for(seconds: float) -> None:
        task = asyncio.ensure_future(collect_when_idle(lambda: idle[0], interval_s=0.005,
                                                       after_middle_passes=3))
        await asyncio.sleep(seconds)
        task.cancel()

    def busy_then_idle() -> None:
        gc.collect()  # a full pass: the middle passes since it restart at 0
        holder = [_Cycle("old")]
        gc.collect(1)  # the cycle survives into the old generation
        holder.clear()  # now garbage that only a full pass finds
        gc.collect(1)
        gc.collect(1)  # three middle passes: a full pass is due
        assert gc.get_count()[2] >= 3 and _Cycle.freed == []
        asyncio.run(serve_for(0.05))  # busy: due, but it waits
        assert _Cycle.freed == []
        idle[0] = True
        asyncio.run(serve_for(0.05))  # idle: it runs, once (then none is due)

    assert _full_passes_while(busy_then_idle) == 1 + 1  # the test's own, then the idle one
    assert _Cycle.freed == ["old"]


def test_a_short_pass_is_not_logged() -> None:
    hook = GCPauseLog(threshold_s=60.0)
    hook("start", {"generation": 0})
    hook("stop", {"generation": 0, "collected": 3})
    assert hook.num_long_pauses == 0


class _Cycle:
    freed: list[str] = []

    def __init__(self, name: str) -> None:
        self.name, self.me = name, self

    def __del__(self) -> None:
        _Cycle.freed.append(self.name)


def test_collector_paused_collects_first_then_keeps_the_collector_off() -> None:
    """What CUDA graph capture relies on: earlier garbage is freed before the block, none
    during it, and the collector's state comes back afterwards."""
    _Cycle.freed.clear()
    _Cycle("before")  # unreachable at once, freed only by a collection
    assert gc.isenabled()
    with collector_paused():
        assert _Cycle.freed == ["before"] and not gc.isenabled()
        _Cycle("during")
        for _ in range(20_000):  # would trigger generation-0 passes were the collector on
            [[]]  # noqa: B018
        assert _Cycle.freed == ["before"]
    assert gc.isenabled()
    gc.collect()
    assert _Cycle.freed == ["before", "during"]


def test_collector_paused_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
