"""The engine process hands work between threads at a short GIL switch interval."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from kvtier.config import EngineConfig
from kvtier.engine.engine_process import EngineProcessSpec, StartFailed, run_engine_process
from kvtier.utils.gil import SWITCH_INTERVAL_S, shorten_switch_interval


@pytest.fixture
def restored_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_helper_sets_the_short_interval(restored_interval: None) -> None:
    sys.setswitchinterval(0.005)
    shorten_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
    assert SWITCH_INTERVAL_S < 0.005  # shorter than Python's default


def _report_engine_process_interval(model: str, engine_end: Connection,
                                    report: Connection) -> None:
    """Child: run the engine process's main (its engine fails to build), then report the
    switch interval it left."""
    run_engine_process(EngineProcessSpec(EngineConfig.from_kwargs(model=model)), [engine_end])
    report.send(sys.getswitchinterval())


def test_the_engine_process_runs_at_the_short_interval(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    front_end, engine_end = context.Pipe()
    report_in, report_out = context.Pipe(duplex=False)
    child = context.Process(target=_report_engine_process_interval,
                            args=(f"{tmp_path}/missing", engine_end, report_out))
    child.start()
    try:
        assert front_end.poll(60)
        assert isinstance(front_end.recv(), StartFailed)  # it got as far as building
        assert report_in.poll(60)
        assert report_in.recv() == pytest.approx(SWITCH_INTERVAL_S)
    finally:
        child.join(60)
    assert child.exitcode == 0
