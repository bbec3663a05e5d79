"""CoreFanout: one engine core's updates split among several front ends' pipes.

Each front end must get exactly the acceptances, outputs and aborts of the requests it sent
(and the count of its adds the core drained, which its admission control subtracts); the
stats snapshot reaches every front end; the core stops only when every front end has
stopped; a front end whose pipe closes has its live requests aborted.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from kvtier.engine import core_fanout
from kvtier.engine.async_types import EngineSnapshot
from kvtier.engine.core_fanout import CoreFanout
from kvtier.engine.core_messages import (
    Aborted,
    AbortRequest,
    Accepted,
    AddRequest,
    CacheReset,
    CoreUpdate,
    ResetPrefixCache,
    StopCore,
)
from kvtier.engine.engine_core import CommandInbox
from kvtier.engine.stats import EngineStats
from kvtier.types import InvalidRequestError, OutputDelta, PrefixCacheReset, SamplingParams

PARAMS = SamplingParams(max_tokens=4)


class FrontEnds:
    """Two (or more) front ends' pipe ends, and the fanout over the engine's ends."""

    def __init__(self, count: int) -> None:
        pairs = [multiprocessing.Pipe() for _ in range(count)]
        self.front: list[Connection] = [front for front, _ in pairs]
        self.inbox = CommandInbox()
        self.fanout = CoreFanout([engine for _, engine in pairs], self.inbox)
        self.fanout.start_readers()

    def add(self, index: int, request_id: str) -> None:
        self.front[index].send(AddRequest(request_id, [1, 2, 3], PARAMS, time.monotonic()))

    def take(self, expected: int) -> list[object]:
        """The commands the core would drain, once `expected` of them arrived."""
        taken: list[object] = []
        deadline = time.monotonic() + 5
        while len(taken) < expected:
            commands, _ = self.inbox.take(0.05)
            taken.extend(commands)
            assert time.monotonic() < deadline, f"only {taken} arrived"
        return taken

    def received(self, index: int) -> list[CoreUpdate]:
        updates = []
        while self.front[index].poll(0.2):
            updates.append(self.front[index].recv())
        return updates


def snapshot(num_live: int) -> EngineSnapshot:
    return EngineSnapshot(EngineStats(), 10, 10, num_live_requests=num_live)


def delta(request_id: str, finished: bool, text: str = "x", token_id: int = 7) -> OutputDelta:
    return OutputDelta(request_id=request_id, new_token_ids=[token_id], new_text=text,
                       finished=finished, finish_reason="length" if finished else None,
                       stop_reason=None, metrics=None)


@pytest.fixture
def two() -> Iterator[FrontEnds]:
    front_ends = FrontEnds(2)
    yield front_ends
    for conn in front_ends.front:
        conn.close()


def test_each_front_end_gets_only_its_own_requests(two: FrontEnds) -> None:
    two.add(0, "a1")
    two.add(1, "b1")
    two.add(1, "b2")
    two.add(0, "a2")
    assert {c.request_id for c in two.take(4)} == {"a1", "a2", "b1", "b2"}  # type: ignore[attr-defined]
    refused = InvalidRequestError("prompt too long")
    two.fanout.emit(CoreUpdate(
        snapshot(3), num_adds_drained=4, time=1.0,
        accepted=[Accepted("a1"), Accepted("b1"), Accepted("b2", refused), Accepted("a2")],
        outputs=[delta("b1", False), delta("a1", True)],
        aborted=[Aborted("a2", "timeout", None)]))
    (first_a,) = two.received(0)
    (first_b,) = two.received(1)
    assert [a.request_id for a in first_a.accepted] == ["a1", "a2"]
    assert [a.request_id for a in first_b.accepted] == ["b1", "b2"]
    assert str(first_b.accepted[1].error) == "prompt too long"
    assert (first_a.num_adds_drained, first_b.num_adds_drained) == (2, 2)
    assert [d.request_id for d in first_a.outputs] == ["a1"]
    assert [d.request_id for d in first_b.outputs] == ["b1"]
    assert [a.request_id for a in first_a.aborted] == ["a2"] and first_b.aborted == []
    assert first_a.snapshot == first_b.snapshot == snapshot(3)
    # a1 finished, a2 was aborted and b2 refused: only b1 is still owned, by front end 1.
    assert two.fanout._owners == {"b1": 1}
    two.fanout.emit(CoreUpdate(snapshot(1), 0, 2.0, outputs=[delta("b1", True)]))
    assert [d.request_id for d in two.received(1)[0].outputs] == ["b1"]
    assert two.fanout._owners == {}


def test_snapshots_without_outputs_are_held_back_then_flushed(
        two: FrontEnds, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_fanout, "SNAPSHOT_INTERVAL_S", 0.3)
    two.add(0, "a1")
    two.take(1)
    two.fanout.emit(CoreUpdate(snapshot(1), 1, 1.0, accepted=[Accepted("a1")]))
    for live in range(2, 7):  # turns with outputs for front end 0 only
        two.fanout.emit(CoreUpdate(snapshot(live), 0, 1.0, outputs=[delta("a1", False)]))
    assert len(two.front[0].recv().accepted) == 1
    assert [two.front[0].recv().snapshot.num_live_requests for _ in range(5)] == [2, 3, 4, 5, 6]
    # Front end 1 got the first snapshot at once; the later ones came within the interval,
    # so only the newest of them follows, from the flusher, once the interval has passed.
    assert two.front[1].recv().snapshot == snapshot(1)
    assert not two.front[1].poll(0.15)
    assert two.front[1].poll(1.0) and two.front[1].recv().snapshot == snapshot(6)
    assert not two.front[1].poll(0.5)  # nothing is sent twice
    two.fanout.emit(CoreUpdate(None, 0, 1.0))  # no snapshot, nothing of anyone's: not sent
    assert two.received(0) == [] and two.received(1) == []
    two.fanout.emit(CoreUpdate(snapshot(0), 0, 1.0, closed=True))  # the last goes to all
    assert [u.closed for u in two.received(0) + two.received(1)] == [True, True]


def test_the_core_stops_once_every_front_end_has(two: FrontEnds) -> None:
    two.front[0].send(StopCore())
    _, stop = two.inbox.take(0.3)
    assert not stop  # front end 1 still serves
    two.add(1, "b1")
    commands, stop = two.inbox.take(1.0)
    assert [c.request_id for c in commands] == ["b1"] and not stop  # type: ignore[attr-defined]
    two.front[1].send(StopCore())
    _, stop = two.inbox.take(1.0)
    assert stop


def test_a_front_end_gone_has_its_requests_aborted(two: FrontEnds) -> None:
    two.add(0, "a1")
    two.add(1, "b1")
    two.add(0, "a2")
    two.take(3)
    two.fanout.emit(CoreUpdate(snapshot(3), 3, 1.0, accepted=[
        Accepted("a1"), Accepted("b1"), Accepted("a2")]))
    two.received(0)
    two.received(1)
    two.front[0].close()  # front end 0 died
    aborts = two.take(2)
    assert all(isinstance(c, AbortRequest) and c.reason is None for c in aborts)
    assert {c.request_id for c in aborts} == {"a1", "a2"}  # type: ignore[attr-defined]
    # The core's aborts are dropped for the gone front end; the other one is unaffected.
    two.fanout.emit(CoreUpdate(snapshot(1), 0, 2.0, outputs=[delta("b1", False)],
                               aborted=[Aborted("a1", None, None), Aborted("a2", None, None)]))
    assert [d.request_id for d in two.received(1)[0].outputs] == ["b1"]
    assert two.fanout._owners == {"b1": 1}
    _, stop = two.inbox.take(0.1)
    assert not stop
    two.front[1].close()
    deadline = time.monotonic() + 5
    while not two.inbox.take(0.1)[1]:
        assert time.monotonic() < deadline, "the core was never told to stop"


def test_a_cache_reset_is_answered_to_the_front_end_that_asked(two: FrontEnds) -> None:
    two.front[1].send(ResetPrefixCache("reset-b", tiers=True))
    assert two.take(1) == [ResetPrefixCache("reset-b", tiers=True)]
    done = CacheReset("reset-b", PrefixCacheReset(True, device_blocks=5, tier_entries=2))
    two.fanout.emit(CoreUpdate(snapshot(0), 0, 1.0, resets=[done]))
    (to_b,) = two.received(1)
    assert to_b.resets == [done]
    assert [u.resets for u in two.received(0)] == [[]]  # the snapshot only
    assert two.fanout._owners == {}


@pytest.mark.parametrize("kib", [16, 64])  # under and over DIRECT_SEND_MAX_BYTES
def test_a_front_end_that_stops_reading_stalls_neither_the_core_nor_the_others(
        two: FrontEnds, kib: int) -> None:
    """Front end 0 stops reading while its request streams updates far larger than a pipe
    holds: the core's emits still return at once, front end 1 gets every update of its own,
    and front end 0, reading again, gets all of its own in order."""
    two.add(0, "a1")
    two.add(1, "b1")
    two.take(2)
    turns = 40
    big = "y" * kib * 1024  # 40 turns: many times what a pipe buffers

    def core_loop() -> None:
        two.fanout.emit(CoreUpdate(snapshot(2), 2, 1.0,
                                   accepted=[Accepted("a1"), Accepted("b1")]))
        for turn in range(turns):
            two.fanout.emit(CoreUpdate(snapshot(2), 0, 1.0, outputs=[
                delta("a1", False, text=big, token_id=turn), delta("b1", turn == turns - 1)]))

    core = threading.Thread(target=core_loop, daemon=True)
    core.start()
    core.join(10)
    assert not core.is_alive(), "the core's loop blocked on front end 0's full pipe"
    to_b = two.received(1)
    assert [d.finished for u in to_b for d in u.outputs] == [False] * (turns - 1) + [True]
    assert not two.fanout.close(0.3)  # front end 0 still holds the rest back
    to_a = [two.front[0].recv() for _ in range(turns + 1)]
    assert [d.new_token_ids[0] for u in to_a[1:] for d in u.outputs] == list(range(turns))
    assert all(d.new_text == big for u in to_a[1:] for d in u.outputs)
    assert two.fanout.close(5.0)  # everything went out


def test_a_front_end_that_stops_reading_holds_only_the_newest_snapshot(
        two: FrontEnds) -> None:
    """While front end 1 stops reading (its pipe full with one large update), front end 0's
    request runs 50 more turns: front end 1 then gets its own updates and one snapshot, the
    newest, instead of one per turn (which grew without bound while it was frozen)."""
    two.add(0, "a1")
    two.add(1, "b1")
    two.take(2)
    two.fanout.emit(CoreUpdate(snapshot(2), 2, 1.0, accepted=[Accepted("a1"), Accepted("b1")]))
    huge = delta("b1", False, text="z" * 8 * 1024 * 1024)
    two.fanout.emit(CoreUpdate(snapshot(2), 0, 2.0, outputs=[huge, delta("a1", False)]))
    turns = 50
    for turn in range(turns):
        two.fanout.emit(CoreUpdate(snapshot(100 + turn), 0, 3.0 + turn,
                                   outputs=[delta("a1", turn == turns - 1)]))
        time.sleep(0.01)  # past SNAPSHOT_INTERVAL_S: posted at once or by the flusher
    assert len(two.received(0)) == turns + 2  # front end 0 was served all along
    to_b = two.received(1)
    assert [u.accepted[0].request_id for u in to_b[:1]] == ["b1"]
    assert to_b[1].outputs[0].new_text == huge.new_text
    snapshots = [u.snapshot for u in to_b[2:]]
    assert snapshots == [snapshot(100 + turns - 1)]
    assert all(not (u.outputs or u.accepted) for u in to_b[2:])


def test_small_updates_to_a_reading_front_end_are_written_by_the_core_itself(
        two: FrontEnds, monkeypatch: pytest.MonkeyPatch) -> None:
    """The common case stays a plain send on the core's loop: waking a sender thread for
    every step's update cost S 12-14% in decode step time with four front ends. An update too
    large to be sure of the pipe's room goes through the sender thread."""
    writers: list[str] = []
    conn = two.fanout._conns[0]
    send_bytes = conn.send_bytes

    def record(payload: memoryview) -> None:
        writers.append(threading.current_thread().name)
        send_bytes(payload)

    monkeypatch.setattr(conn, "send_bytes", record)
    two.add(0, "a1")
    two.take(1)
    two.fanout.emit(CoreUpdate(snapshot(1), 1, 1.0, accepted=[Accepted("a1")]))
    large = delta("a1", False, text="z" * (core_fanout.DIRECT_SEND_MAX_BYTES + 1))
    two.fanout.emit(CoreUpdate(snapshot(1), 0, 2.0, outputs=[large]))
    two.fanout.emit(CoreUpdate(snapshot(1), 0, 3.0, outputs=[delta("a1", True)]))
    received = two.received(0)
    assert [len(u.accepted) + len(u.outputs) for u in received] == [1, 1, 1]
    assert received[1].outputs[0].new_text == large.new_text
    core = threading.current_thread().name
    assert writers[0] == core
    assert writers[1] == "kvtier-updates-0"
    assert writers[2] in (core, "kvtier-updates-0")  # queued behind the large one, or not
