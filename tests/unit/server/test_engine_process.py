"""AsyncEngine.spawn: the engine core in a child process, with a real (tiny, random) model.

What crosses the pipe must rebuild the same outputs as the offline API; refusals, aborts,
timeouts and a dead child must end every caller's wait with the right error, and leave no KV
blocks behind.
"""

from __future__ import annotations

import asyncio
import os
import pstats
import signal
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from kvtier import LLM
from kvtier.config import EngineConfig
from kvtier.engine.async_engine import (
    AsyncEngine,
    EngineClosedError,
    RequestAbortedError,
)
from kvtier.engine.engine_process import EngineProcessSpec, spawn_engine_process
from kvtier.model.spec import ModelLoadError
from kvtier.types import InvalidRequestError, RequestOutput, SamplingParams
from kvtier.utils.profiling import ENGINE_PROFILE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "random:tiny-llama"
ENGINE_ARGS = {"max_model_len": 256, "num_gpu_blocks_override": 256}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def spawn(overlap_outputs: bool = False, async_scheduling: bool = False,
          **kwargs: object) -> AsyncEngine:
    config = EngineConfig.from_kwargs(model=MODEL, overlap_outputs=overlap_outputs,
                                      async_scheduling=async_scheduling, **ENGINE_ARGS)
    engine = AsyncEngine.spawn(config, **kwargs)
    engine.start()
    return engine


@pytest.fixture(scope="module", params=["sync", "overlapped", "async"],
                ids=["sync-turn", "overlapped-turn", "async-scheduling"])
def engine(request: pytest.FixtureRequest) -> Iterator[AsyncEngine]:
    """The engine core's synchronous turn, `overlap_outputs` (a step's outputs are sent
    while the next step runs) and `async_scheduling` (the next step launched before a step's
    tokens are read): the streams must be the same."""
    engine = spawn(overlap_outputs=request.param == "overlapped",
                   async_scheduling=request.param == "async")
    yield engine
    asyncio.run(engine.shutdown())
    assert not engine.is_alive


async def collect(engine: AsyncEngine, prompt: str | list[int],
                  params: SamplingParams = GREEDY) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params)]


def wait_idle(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        snap = engine.snapshot()
        if snap.num_live_requests == 0 and snap.num_free_blocks == snap.num_total_blocks:
            return
        assert time.monotonic() < deadline, f"never idle: {snap}"
        time.sleep(0.02)


def test_streams_rebuild_the_offline_outputs(engine: AsyncEngine) -> None:
    prompts = ["The tiny model says", [5, 17, 99, 3, 250, 7], "another prompt, longer than one"]
    offline = LLM(MODEL, **ENGINE_ARGS).generate(prompts, GREEDY)

    async def all_streams() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    for streamed, expected in zip(asyncio.run(all_streams()), offline, strict=True):
        final = streamed[-1]
        assert final.finished and [o.finished for o in streamed[:-1]] == [False] * (
            len(streamed) - 1)
        assert final.outputs[0].token_ids == expected.outputs[0].token_ids
        assert final.outputs[0].text == expected.outputs[0].text
        assert "".join(o.new_text for o in streamed) == expected.outputs[0].text
        assert sum(len(o.new_token_ids) for o in streamed) == len(expected.outputs[0].token_ids)
        assert final.prompt_token_ids == expected.prompt_token_ids
        assert final.outputs[0].finish_reason == "length"
        # Metrics cross only with the first and the last delta; every output still has them.
        assert all(o.metrics.first_token_time is not None for o in streamed)
        assert final.metrics.finished_time is not None
        assert final.metrics.num_prompt_tokens == len(expected.prompt_token_ids)
    assert engine.tokenizer is not None and engine.max_model_len == 256
    wait_idle(engine)


def test_bad_request_is_refused_before_any_output(engine: AsyncEngine) -> None:
    # Each refusal names the field at fault (the server's error `param`), across the pipe.
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as refused:
        asyncio.run(collect(engine, [10**9]))
    assert refused.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="max_model_len") as refused:
        asyncio.run(collect(engine, list(range(300))))
    assert refused.value.param == "prompt"
    out_of_vocab = 10**9
    for field, value in (("stop_token_ids", (out_of_vocab,)),
                         ("allowed_token_ids", (out_of_vocab,)),
                         ("logit_bias", {out_of_vocab: 1.0})):
        params = SamplingParams(max_tokens=2, **{field: value})  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="outside") as refused:
            asyncio.run(collect(engine, [1, 2], params))
        assert refused.value.param == field
    wait_idle(engine)


def test_closing_a_stream_aborts_and_frees_its_blocks(engine: AsyncEngine) -> None:
    async def scenario() -> None:
        stream = await engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=200,
                                                                        ignore_eos=True))
        await anext(stream)
        stream.close()

    asyncio.run(scenario())
    wait_idle(engine)


def test_a_prefix_cache_reset_crosses_the_pipe(engine: AsyncEngine) -> None:
    prompt = list(range(5, 45))  # two full blocks and a part

    async def scenario() -> None:
        await collect(engine, prompt)
        warm = (await collect(engine, prompt))[-1]
        assert warm.num_cached_tokens >= 32
        result = await engine.reset_prefix_cache()
        assert result.reset and result.device_blocks >= 2, result
        cold = (await collect(engine, prompt))[-1]
        assert cold.num_cached_tokens == 0
        assert cold.outputs[0].token_ids == warm.outputs[0].token_ids
        # Accepted: the core holds the request, which needs 200 steps; the reset follows at
        # once, a turn or two later.
        stream = await engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=200,
                                                                        ignore_eos=True))
        refused = await engine.reset_prefix_cache()
        stream.close()
        assert not refused.reset and "unfinished" in str(refused.reason), refused

    asyncio.run(scenario())
    wait_idle(engine)


def test_timeout_aborts_with_partial_output() -> None:
    engine = spawn(request_timeout_s=0.05)

    async def timed_out() -> RequestAbortedError:
        with pytest.raises(RequestAbortedError) as info:
            # 250 decode steps take far longer than the 50 ms allowed.
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=250,
                                                                     ignore_eos=True)):
                pass
        return info.value

    error = asyncio.run(timed_out())
    assert error.reason == "timeout"
    assert error.output is not None and error.output.outputs[0].finish_reason == "abort"
    wait_idle(engine)
    asyncio.run(engine.shutdown())


def test_dead_child_ends_every_wait() -> None:
    engine = spawn()
    params = SamplingParams(max_tokens=240, ignore_eos=True)

    async def killed() -> None:
        stream = await engine.add_request([4, 5, 6], params)
        await anext(stream)
        assert engine._process is not None and engine._process._process is not None
        os.kill(engine._process._process.pid, signal.SIGKILL)
        with pytest.raises(RequestAbortedError) as info:
            async for _ in stream:
                pass
        assert info.value.reason == "error"
        with pytest.raises(EngineClosedError):
            await engine.add_request([7], params)
        with pytest.raises(EngineClosedError):
            await engine.reset_prefix_cache()

    asyncio.run(killed())
    assert not engine.is_alive
    asyncio.run(engine.shutdown(drain=False))


def test_construction_error_is_reraised_by_start(tmp_path: object) -> None:
    engine = AsyncEngine.spawn(EngineConfig.from_kwargs(model=f"{tmp_path}/missing"))
    with pytest.raises(ModelLoadError, match="no such file"):
        engine.start()
    assert not engine.is_alive


def test_profile_dir_gets_the_core_loop_profile(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The spawned child inherits the variable; the profile is written when the loop ends.
    monkeypatch.setenv(ENGINE_PROFILE_ENV, str(tmp_path / "profiles"))
    engine = spawn()
    outputs = asyncio.run(collect(engine, "The tiny model says"))
    asyncio.run(engine.shutdown())
    assert outputs[-1].finished
    written = list((tmp_path / "profiles").glob("engine-*.prof"))
    assert len(written) == 1
    functions = {(Path(file).name, name) for file, _, name in pstats.Stats(str(written[0])).stats}
    # The core's loop and the scheduler it drives ran under the profiler.
    assert ("engine_core.py", "_loop") in functions
    assert ("scheduler.py", "schedule") in functions


def test_unusable_profile_dir_fails_the_start(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(ENGINE_PROFILE_ENV, str(tmp_path / "a-file" / "profiles"))
    engine = AsyncEngine.spawn(EngineConfig.from_kwargs(model=MODEL, **ENGINE_ARGS))
    with pytest.raises(ValueError, match=f"{ENGINE_PROFILE_ENV}=.*cannot create"):
        engine.start()
    assert not engine.is_alive


# -- one engine process, two front ends (`kvtier serve --api-server-count 2`) ----------------


def attach_two(model: str = MODEL, **config: object) -> tuple[list[AsyncEngine], BaseProcess]:
    spec = EngineProcessSpec(EngineConfig.from_kwargs(model=model, **ENGINE_ARGS, **config))
    process, conns = spawn_engine_process(spec, 2)
    return [AsyncEngine.attach(conn, spec) for conn in conns], process


@pytest.mark.parametrize("mode", ["sync", "overlapped", "async"])
def test_two_front_ends_share_one_engine_process(mode: str) -> None:
    # The core's turns emit differently in each mode (overlapped: two updates a turn, the
    # first without a snapshot); the fan-out must route all of them.
    (first, second), process = attach_two(overlap_outputs=mode == "overlapped",
                                          async_scheduling=mode == "async")
    for engine in (first, second):
        engine.start()
    prompts = ["The tiny model says", [5, 17, 99, 3, 250, 7], "another prompt", [9, 8, 7]]
    offline = LLM(MODEL, **ENGINE_ARGS).generate(prompts, GREEDY)

    async def both() -> list[list[RequestOutput]]:
        # Interleaved: front end i sends prompts i, i+2, all at once.
        return await asyncio.gather(*(collect((first, second)[i % 2], p)
                                      for i, p in enumerate(prompts)))

    for streamed, expected in zip(asyncio.run(both()), offline, strict=True):
        assert streamed[-1].finished and sum(1 for o in streamed if o.finished) == 1
        assert streamed[-1].outputs[0].token_ids == expected.outputs[0].token_ids
        assert "".join(o.new_text for o in streamed) == expected.outputs[0].text
    wait_idle(first)
    wait_idle(second)

    async def stop_first_then_use_second() -> list[RequestOutput]:
        # The first front end stops; the engine keeps serving the second until it stops too.
        stopping = asyncio.ensure_future(first.shutdown())
        await asyncio.sleep(0.3)
        assert not stopping.done() and process.is_alive()
        with pytest.raises(EngineClosedError):
            await first.add_request([1], GREEDY)
        outputs = await collect(second, prompts[0])
        await second.shutdown()
        await asyncio.wait_for(stopping, 30)
        return outputs

    assert asyncio.run(stop_first_then_use_second())[-1].outputs[0].token_ids == (
        offline[0].outputs[0].token_ids)
    process.join(30)
    assert process.exitcode == 0


def test_a_front_end_gone_frees_its_requests_blocks() -> None:
    (doomed, survivor), process = attach_two()
    for engine in (doomed, survivor):
        engine.start()
    params = SamplingParams(max_tokens=240, ignore_eos=True)

    async def scenario() -> None:
        stream = await doomed.add_request([4, 5, 6], params)
        await anext(stream)
        deadline = time.monotonic() + 5
        while survivor.snapshot().num_live_requests != 1:  # the other front end's stats
            assert time.monotonic() < deadline, survivor.snapshot()
            await asyncio.sleep(0.01)
        assert doomed._process is not None
        doomed._process.close()  # its pipe closes, as when its process dies
        with pytest.raises(RequestAbortedError):
            async for _ in stream:
                pass

    asyncio.run(scenario())
    wait_idle(survivor)  # the engine aborted the orphan and freed its blocks
    assert asyncio.run(collect(survivor, [1, 2, 3]))[-1].finished
    asyncio.run(survivor.shutdown())
    process.join(30)
    assert process.exitcode == 0


def test_every_front_end_sees_the_construction_error(tmp_path: object) -> None:
    engines, process = attach_two(model=f"{tmp_path}/missing")
    for engine in engines:
        with pytest.raises(ModelLoadError, match="no such file"):
            engine.start()
        assert not engine.is_alive
    process.join(30)


def test_every_front_end_gets_the_engines_sampling_defaults() -> None:
    """The engine process reads the generation config; its front ends fill requests' unset
    sampling fields from what its Ready message carries."""
    engines, process = attach_two(generation_config="vllm",
                                  override_generation_config={"temperature": 0.0,
                                                              "max_new_tokens": 3})
    for engine in engines:
        engine.start()
        assert engine.sampling_defaults.items() == {"temperature": 0.0, "max_tokens": 3}

    async def shut_down() -> None:  # the engine stops once its last front end does
        await asyncio.gather(*(engine.shutdown() for engine in engines))

    asyncio.run(shut_down())
    process.join(30)
    assert process.exitcode == 0


def test_a_cache_salt_crosses_the_pipe(engine: AsyncEngine) -> None:
    """The engine process salts the request's block hashes: a second run with the same salt
    hits the cache, one with another salt does not."""
    prompt = list(range(300, 340))  # two full blocks of 16 and then some

    async def run(salt: str) -> RequestOutput:
        stream = await engine.add_request(prompt, GREEDY, cache_salt=salt)
        outputs = [out async for out in stream]
        return outputs[-1]

    async def three() -> list[int]:
        return [(await run(salt)).num_cached_tokens for salt in ("x", "x", "y")]

    assert asyncio.run(three()) == [0, 32, 0]
