"""AsyncEngine over a fake engine: delivery, admission, aborts, timeouts, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvtier.engine.async_engine import (
    AsyncEngine,
    EngineClosedError,
    QueueFullError,
    RequestAbortedError,
)
from kvtier.types import InvalidRequestError, RequestOutput, SamplingParams
from tests.unit.server.fakes import FakeEngine, start_async_engine

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True, params=["sync", "overlapped", "async"],
                ids=["sync-turn", "overlapped-turn", "async-scheduling"])
def core_turn(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the engine core's synchronous turn, with `overlap_outputs` (a
    step's outputs sent while the next step runs) and with `async_scheduling` (the next step
    launched before a step's tokens are read): delivery, aborts, timeouts and failures must
    not depend on it."""
    monkeypatch.setattr(FakeEngine, "overlap_outputs", request.param == "overlapped")
    monkeypatch.setattr(FakeEngine, "async_scheduling", request.param == "async")
    return request.param


def params(max_tokens: int = 3) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


async def collect(engine: AsyncEngine, prompt: str, max_tokens: int = 3) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params(max_tokens))]


def test_generate_streams_every_token_then_finishes() -> None:
    fake = FakeEngine()
    engine = start_async_engine(fake)
    outputs = asyncio.run(collect(engine, "hello", 4))
    # A consumer that falls behind the engine gets queued outputs merged (test below), so
    # the outputs may be fewer than the tokens, but they carry every token, in order.
    assert "".join(o.new_text for o in outputs) == "t0 t1 t2 t3 "
    assert sum(len(o.new_token_ids) for o in outputs) == 4
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert outputs[-1].outputs[0].finish_reason == "length"
    asyncio.run(engine.shutdown())
    assert fake.shut_down
    assert fake.threads == {engine._thread.ident}  # every engine call on the engine thread


def test_concurrent_requests_from_one_loop() -> None:
    engine = start_async_engine(FakeEngine(max_running=4))

    async def many() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine, f"p{i}", 5) for i in range(20)))

    results = asyncio.run(many())
    assert all(sum(len(o.new_token_ids) for o in r) == 5 and r[-1].finished
               and not any(o.finished for o in r[:-1]) for r in results)
    asyncio.run(engine.shutdown())


def test_invalid_request_raises_before_any_output() -> None:
    fake = FakeEngine()
    engine = start_async_engine(fake)
    with pytest.raises(InvalidRequestError, match="empty"):
        asyncio.run(collect(engine, ""))
    assert not fake.requests
    assert engine.snapshot().num_live_requests == 0
    asyncio.run(engine.shutdown())


def test_queue_full_then_recovers() -> None:
    fake = FakeEngine(max_running=1, step_delay_s=0.01)
    engine = start_async_engine(fake, max_waiting_requests=2)

    async def scenario() -> None:
        runner = await engine.add_request("runner", params(1000))
        await anext(runner)
        waiters = [await engine.add_request(f"w{i}", params(2)) for i in range(2)]
        with pytest.raises(QueueFullError) as info:
            await engine.add_request("too many", params(2))
        assert info.value.retry_after_s >= 1
        runner.close()
        for waiter in waiters:
            assert [o async for o in waiter][-1].finished
        assert (await anext(await engine.add_request("again", params(1)))).finished

    asyncio.run(scenario())
    assert fake.aborted == [fake.aborted[0]] and fake.aborted[0].startswith("req-")
    asyncio.run(engine.shutdown())


def test_closing_or_cancelling_a_stream_aborts_the_request() -> None:
    fake = FakeEngine(step_delay_s=0.01)
    engine = start_async_engine(fake)

    async def scenario() -> None:
        stream = await engine.add_request("closed early", params(1000), "a")
        await anext(stream)
        stream.close()

        async def consume() -> None:
            async for _ in engine.generate("cancelled", params(1000), "b"):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert sorted(fake.aborted) == ["a", "b"] and not fake.requests
    asyncio.run(engine.shutdown())


def test_request_timeout_aborts_with_partial_output() -> None:
    fake = FakeEngine(step_delay_s=0.01)
    engine = start_async_engine(fake, request_timeout_s=0.1)

    async def scenario() -> RequestAbortedError:
        with pytest.raises(RequestAbortedError) as info:
            await collect(engine, "slow", 10_000)
        return info.value

    error = asyncio.run(scenario())
    assert error.reason == "timeout"
    assert error.output is not None and error.output.outputs[0].finish_reason == "abort"
    assert not fake.requests
    asyncio.run(engine.shutdown())


@pytest.mark.parametrize("reason", ["timeout", "error", "shutdown"])
def test_an_abort_behind_outputs_a_lagging_stream_holds_comes_after_them(reason: str) -> None:
    """A stream that stops reading holds its outputs merged; a timeout, a failed step or a
    shutdown then aborts the request: the stream gives the held tokens, then the error."""
    fake = FakeEngine(step_delay_s=0.01)
    engine = start_async_engine(fake, request_timeout_s=0.2 if reason == "timeout" else None)

    async def scenario() -> tuple[list[int], int, RequestAbortedError]:
        stream = await engine.add_request("lagging", params(10_000), "lag")
        tokens = list((await anext(stream)).new_token_ids)
        await asyncio.sleep(0.05)  # steps arrive while nothing reads
        if reason == "error":
            fake.fail_steps = 1
        stopping = (asyncio.ensure_future(engine.shutdown(drain=False))
                    if reason == "shutdown" else None)
        for _ in range(300):
            if any(isinstance(item, BaseException) for item in stream._sink._items):
                break
            await asyncio.sleep(0.01)
        held = list(stream._sink._items)
        assert [type(item) for item in held] == [RequestOutput, RequestAbortedError]
        merged = await anext(stream)
        tokens += merged.new_token_ids
        with pytest.raises(RequestAbortedError) as info:
            await anext(stream)
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        if stopping is not None:
            await stopping
        return tokens, len(merged.new_token_ids), info.value

    tokens, num_merged, error = asyncio.run(scenario())
    assert tokens == list(range(len(tokens))) and num_merged > 1
    assert error.reason == reason and not fake.requests
    if reason == "timeout":  # the error's output is what the stream gave
        assert error.output is not None and error.output.outputs[0].token_ids == tokens
    asyncio.run(engine.shutdown(drain=False))


def test_failed_step_fails_live_requests_and_engine_keeps_serving() -> None:
    fake = FakeEngine(fail_steps=1)
    engine = start_async_engine(fake)
    with pytest.raises(RequestAbortedError) as info:
        asyncio.run(collect(engine, "unlucky"))
    assert info.value.reason == "error"
    assert asyncio.run(collect(engine, "lucky"))[-1].finished
    asyncio.run(engine.shutdown())


def test_shutdown_drains_then_aborts_the_rest() -> None:
    fake = FakeEngine(step_delay_s=0.01)
    engine = start_async_engine(fake)

    async def scenario() -> tuple[list[RequestOutput], BaseException]:
        short = asyncio.ensure_future(collect(engine, "short", 5))
        long = asyncio.ensure_future(collect(engine, "long", 100_000))
        await asyncio.sleep(0.02)
        await engine.shutdown(drain=True, timeout_s=0.3)
        with pytest.raises(EngineClosedError):
            await engine.add_request("late", params())
        results = await asyncio.gather(short, long, return_exceptions=True)
        assert isinstance(results[0], list)
        assert isinstance(results[1], BaseException)
        return results[0], results[1]

    short, long_error = asyncio.run(scenario())
    assert short[-1].finished and short[-1].outputs[0].finish_reason == "length"
    assert isinstance(long_error, RequestAbortedError) and long_error.reason == "shutdown"
    assert fake.shut_down and not engine.is_alive and not fake.requests


def test_listener_sees_outputs_before_the_consumer() -> None:
    engine = start_async_engine(FakeEngine())
    seen: list[int] = []
    engine.add_listener(lambda outputs, now: seen.extend(
        t for o in outputs for t in o.new_token_ids))

    async def scenario() -> None:
        received = 0
        async for output in engine.generate("x", params(3)):
            received += len(output.new_token_ids)  # merged outputs carry several steps'
            assert len(seen) >= received

    asyncio.run(scenario())
    asyncio.run(engine.shutdown())


def test_construction_error_is_reraised_by_start() -> None:
    def broken() -> FakeEngine:
        raise FileNotFoundError("no such model")

    engine = AsyncEngine(broken)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        engine.start()


def test_idle_engine_thread_sleeps() -> None:
    fake = FakeEngine()
    engine = start_async_engine(fake)
    asyncio.run(collect(engine, "wake up"))
    # The thread may finish its last turn just after the client has the final output: wait
    # for the calls to stop (a polling thread never would), then watch it stay idle.
    calls, deadline = fake.num_calls, time.monotonic() + 2.0
    while True:
        threading.Event().wait(0.05)
        if fake.num_calls == calls:
            break
        assert time.monotonic() < deadline, "the engine thread kept calling the engine"
        calls = fake.num_calls
    threading.Event().wait(0.2)
    assert fake.num_calls == calls  # no polling while there is nothing to do
    asyncio.run(engine.shutdown())


def test_a_second_request_with_a_live_id_is_refused() -> None:
    """Acceptances and outputs are routed by request id: two live requests with one id used
    to leave the first caller waiting forever, and give the second the first one's tokens."""
    engine = start_async_engine(FakeEngine())

    async def both() -> list[object]:
        async def one(prompt: str) -> object:
            try:
                return [o.finished async for o in engine.generate(prompt, params(),
                                                                  request_id="same")]
            except InvalidRequestError as exc:
                return exc

        return await asyncio.wait_for(asyncio.gather(one("a"), one("b")), 10)

    first, second = asyncio.run(both())
    assert first == [False] * (len(first) - 1) + [True]  # type: ignore[arg-type]
    assert isinstance(second, InvalidRequestError) and "already in use" in str(second)
    asyncio.run(engine.shutdown())
