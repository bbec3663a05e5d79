"""The engine core's GC set-up: start-up objects frozen, long collections logged."""

from __future__ import annotations

import gc
import logging

import pytest

from kvtier.utils.gc_pauses import (
    GCPauseLog,
    collector_paused,
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
