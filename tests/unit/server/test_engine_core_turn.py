"""The engine core's turn: when a step's outputs leave the core relative to the next launch.

A client's TTFT ends when its first token leaves the core, and at low concurrency a client
sends its next request only once the previous one finished. So in either turn (synchronous, or
`overlap_outputs`: outputs made while the next step runs) a first token and a finish must be
emitted before the core launches another step; later tokens may trail by one launch in the
overlapped turn, which is the point of it. With `async_scheduling` every token trails by
exactly one launch: step s + 1 is launched before step s's tokens are read.
"""

from __future__ import annotations

import threading
import time

import pytest

from kvtier.engine.core_messages import AddRequest, CoreUpdate
from kvtier.engine.engine_core import CommandInbox, EngineCore
from kvtier.types import SamplingParams
from tests.unit.server.fakes import FakeEngine

pytestmark = pytest.mark.timeout(30)


def run_core(overlap: bool, max_tokens: dict[str, int],
             async_scheduling: bool = False) -> list[tuple[str, str, int, bool]]:
    """Events in order: ("launch", "", step, False) and ("token", request, index, finished)."""
    engine = FakeEngine(step_delay_s=0.0)
    events: list[tuple[str, str, int, bool]] = []
    launches = [0]
    launch_step = engine.launch_step

    def recording_launch():  # type: ignore[no-untyped-def]
        launches[0] += 1
        events.append(("launch", "", launches[0], False))
        return launch_step()

    engine.launch_step = recording_launch  # type: ignore[method-assign]
    done = threading.Event()
    finished: set[str] = set()

    def emit(update: CoreUpdate) -> None:
        for delta in update.outputs:
            for token in delta.new_token_ids:
                events.append(("token", delta.request_id, token, delta.finished))
            if delta.finished:
                finished.add(delta.request_id)
        if finished == set(max_tokens):
            done.set()

    inbox = CommandInbox()
    core = EngineCore(engine, inbox, emit, overlap_outputs=overlap,  # type: ignore[arg-type]
                      async_scheduling=async_scheduling)
    for request_id, count in max_tokens.items():
        inbox.put(AddRequest(request_id, "prompt", SamplingParams(max_tokens=count,
                                                                  temperature=0.0),
                             time.monotonic()))
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    assert done.wait(10), f"not every request finished: {events}"
    inbox.stop()
    thread.join(10)
    return events


def launches_before(events: list[tuple[str, str, int, bool]], index: int) -> int:
    return sum(1 for kind, *_ in events[:index] if kind == "launch")


@pytest.mark.parametrize("overlap", [False, True], ids=["sync-turn", "overlapped-turn"])
def test_first_tokens_and_finishes_leave_before_the_next_launch(overlap: bool) -> None:
    # Both requests run from the first step: the fake gives each running request its token
    # number k in step k + 1, so a token produced by step s must be out before launch s + 1.
    events = run_core(overlap, {"short": 2, "long": 6})
    tokens = [(i, e) for i, e in enumerate(events) if e[0] == "token"]
    assert sorted((e[1], e[2]) for _, e in tokens) == sorted(
        [("short", k) for k in range(2)] + [("long", k) for k in range(6)])
    lag = {}
    for index, (_, request_id, token, is_last) in tokens:
        produced_by = token + 1
        lag[(request_id, token)] = launches_before(events, index) - produced_by
        if token == 0 or is_last:
            assert lag[(request_id, token)] == 0, (request_id, token, events)
    # Tokens in between: the synchronous turn sends them before the next launch too; the
    # overlapped turn sends them while the next step runs (one launch later).
    middle = {key: value for key, value in lag.items() if key[1] not in (0, 5) and
              key != ("short", 1)}
    assert set(middle.values()) == ({1} if overlap else {0}), events


def test_async_scheduling_sends_each_step_after_launching_the_next() -> None:
    events = run_core(False, {"short": 2, "long": 6}, async_scheduling=True)
    tokens = [(i, e) for i, e in enumerate(events) if e[0] == "token"]
    assert sorted((e[1], e[2]) for _, e in tokens) == sorted(
        [("short", k) for k in range(2)] + [("long", k) for k in range(6)])
    # Token k comes from step k + 1; it leaves after launch k + 2 and before launch k + 3
    # (the last step's, with nothing left to launch, right after it is read).
    total = launches_before(events, len(events))
    assert total == 6
    for index, (_, request_id, token, _) in tokens:
        expected = min(token + 2, total)
        assert launches_before(events, index) == expected, (request_id, token, events)
