"""client.py and config.py: traffic shaping, payloads, and whole runs against a fake server.

The fake is a few lines of aiohttp.web speaking the OpenAI streaming protocol; it stands in for
any OpenAI-compatible server (the live kvtier server gets its own tests later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from kvtier.bench.client import (
    INITIAL_TEST_TIMEOUT_S,
    arrival_times,
    run_benchmark,
    stream_request,
)
from kvtier.bench.config import BenchConfig, build_workload
from kvtier.bench.datasets import Conversation, SampleRequest, Workload
from kvtier.utils.resources import find_package_file
from kvtier.utils.tokenizer_json import QWEN_TOKENIZER


class FakeOpenAI:
    """Streams `max_tokens` words per request; 'fail' -> HTTP 500, 'slow' -> sleeps 1 s."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.served = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f"# TYPE fake_served counter\nfake_served_total {self.served}\n")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if prompt == "fail":
            return web.Response(status=500, text="boom")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if prompt == "slow":
                await asyncio.sleep(1)
            return await self._stream(request, body, chat)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, body: dict[str, Any],
                      chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        reply = f"answer{len(body.get('messages', []))}"
        for i in range(body["max_tokens"]):
            word = f"{reply}-{i} "
            choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0,
                                                                             "text": word}
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            await asyncio.sleep(0.002)
        usage = {"prompt_tokens": 11, "completion_tokens": body["max_tokens"]}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                             "data: [DONE]\n\n".encode())
        self.served += 1
        return response


@contextlib.asynccontextmanager
async def serving(fake: FakeOpenAI) -> AsyncIterator[str]:
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def requests(*prompts: str, max_tokens: int = 3) -> Workload:
    return Workload(requests=[SampleRequest(p, 5, max_tokens, request_id=f"id{i}")
                              for i, p in enumerate(prompts)])


async def run_against_fake(fake: FakeOpenAI, workload: Workload, qwen: Any,
                           progress: Any = None, **options: Any):
    async with serving(fake) as url:
        config = BenchConfig(base_url=url, **options)
        return await run_benchmark(config, progress, tokenizer=qwen, workload=workload)


def test_arrival_times_are_vllms_for_the_same_seed():
    """vLLM seeds numpy's global generator and draws one gamma gap per request: 10 requests
    at 4 rps with seed 0 leave at 0.167 s and 0.429 s first (a transcription of its client,
    run during review); our own default_rng stream gave 0.120 s and 0.299 s."""
    np.random.seed(0)
    gaps = np.cumsum([np.random.gamma(shape=1.0, scale=0.25) for _ in range(10)])
    expected = gaps * (10 / 4.0) / gaps[-1]
    assert arrival_times(10, 4.0, 1.0, seed=0) == pytest.approx(expected.tolist())
    assert [round(t, 3) for t in arrival_times(10, 4.0, 1.0, seed=0)[:2]] == [0.167, 0.429]


def test_arrival_times():
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]
    times = arrival_times(20_000, request_rate=50.0, burstiness=1.0, seed=0)
    assert times == arrival_times(20_000, 50.0, 1.0, seed=0)
    assert times[-1] == pytest.approx(20_000 / 50.0)  # rescaled to end at n / rate
    gaps = np.diff(times)
    assert (gaps >= 0).all()
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.05)  # Poisson: CV 1
    smooth = np.diff(arrival_times(20_000, 50.0, burstiness=4.0))
    assert np.std(smooth) / np.mean(smooth) == pytest.approx(0.5, abs=0.05)  # gamma k=4
    assert np.diff(arrival_times(5, 10.0, math.inf)) == pytest.approx([0.1] * 4)


def test_whole_run_completions(qwen):
    fake, seen = FakeOpenAI(), []
    work = requests(*[f"p{i}" for i in range(6)])
    result = asyncio.run(run_against_fake(
        fake, work, qwen, lambda done, total: seen.append((done, total)), max_concurrency=2,
        num_warmups=1, api_key="k", temperature=0.0, ignore_eos=True, model="m"))
    assert (result.completed, result.failed) == (6, 0)
    assert result.total_output_tokens == 18 and result.total_input_tokens == 66  # usage wins
    assert all(len(itl) == 2 for itl in result.per_request["itls"])
    assert result.per_request["generated_texts"][0] == "answer0-0 answer0-1 answer0-2 "
    assert result.server_metrics == {"fake_served_total": 6.0}  # the warm-up is not counted
    assert result.warmup is not None and result.warmup["completed"] == 1
    assert fake.max_in_flight <= 2
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    body, headers = fake.bodies[-1], fake.headers[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"], body["ignore_eos"], body["temperature"]) == \
        ("m", 3, True, 0.0)
    assert headers["authorization"] == "Bearer k"
    assert headers["x-request-id"].startswith("id")
    assert result.to_json()["model_id"] == "m"


def test_failures_are_recorded_and_the_run_goes_on(qwen):
    fake = FakeOpenAI()
    result = asyncio.run(run_against_fake(fake, requests("ok", "fail", "slow"), qwen,
                                          request_timeout_s=0.3, model="m"))
    assert (result.completed, result.failed) == (1, 2)
    errors = result.per_request["errors"]
    assert errors[0] == "" and errors[1].startswith("HTTP 500") and "Timeout" in errors[2]
    assert result.per_request["output_lens"] == [3, 0, 0]


class FakeBadUsage(FakeOpenAI):
    """Streams its choices, then a usage chunk whose `usage` is whatever the prompt names."""

    USAGES: dict[str, Any] = {"str-count": {"completion_tokens": "many"},
                              "list-count": {"completion_tokens": [3]},
                              "str-prompt": {"completion_tokens": 3, "prompt_tokens": "x"},
                              "not-a-table": "lots"}

    async def _stream(self, request: web.Request, body: dict[str, Any],
                      chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": f"w{i} "}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = self.USAGES.get(body["prompt"], {"completion_tokens": body["max_tokens"]})
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                             "data: [DONE]\n\n".encode())
        return response


def test_a_malformed_usage_chunk_fails_its_request_not_the_run(qwen):
    """A server's garbled usage (a count that is no number, usage that is no object) is that
    request's failure, as every other server fault is; it once escaped and ended the run."""
    result = asyncio.run(run_against_fake(FakeBadUsage(), requests("ok", *FakeBadUsage.USAGES),
                                          qwen, model="m"))
    assert (result.completed, result.failed) == (1, 4)
    errors = result.per_request["errors"]
    assert errors[0] == "" and all(errors[1:])


def test_connection_refused_is_a_failed_request():
    async def go():
        import aiohttp

        async with aiohttp.ClientSession() as http:
            return await stream_request(http, "http://127.0.0.1:9/v1/completions",
                                        {"prompt": "x"}, {}, prompt_len=1)

    out = asyncio.run(go())
    assert not out.success and "Connect" in out.error


def test_model_discovery_and_request_rate(qwen):
    fake = FakeOpenAI()
    result = asyncio.run(run_against_fake(fake, requests(*"abcde", max_tokens=1), qwen,
                                          request_rate=20.0, scrape_metrics=False))
    assert {b["model"] for b in fake.bodies} == {"fake-model"}
    starts = sorted(result.per_request["start_times"])
    assert starts[-1] - starts[0] >= 0.15  # the schedule ends at 5 / 20 = 0.25 s
    assert result.duration >= 0.25
    assert result.server_metrics is None
    assert result.mean_tpot_ms == 0.0  # one-token outputs have no TPOT


class FakeEmbeddedModel(FakeOpenAI):
    """Lists the embedded model's served name, as `kvtier serve` with no --model does."""

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "SmolLM2-135M-Instruct"}]})


def test_without_a_tokenizer_the_embedded_models_is_found_in_kvtiers_cache(
        tmp_path, monkeypatch):
    # The converted GGUF's tokenizer.json lies in kvtier's cache once a server has loaded it;
    # any real tokenizer.json stands in for it here. `load_tokenizer` alone cannot find it
    # from the served name (no file, no HF cache entry, no Qwen name).
    converted = tmp_path / "gguf" / "SmolLM2-135M-Instruct-Q8_0"
    converted.mkdir(parents=True)
    shutil.copy(find_package_file(*QWEN_TOKENIZER), converted / "tokenizer.json")
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path))
    fake = FakeEmbeddedModel()

    async def run() -> Any:
        async with serving(fake) as url:
            config = BenchConfig(base_url=url, dataset_name="random", num_prompts=3,
                                 random_input_len=16, random_output_len=2,
                                 scrape_metrics=False)
            return await run_benchmark(config)

    result = asyncio.run(run())
    assert result.completed == 3
    assert {b["model"] for b in fake.bodies} == {"SmolLM2-135M-Instruct"}

    shutil.rmtree(tmp_path / "gguf")  # no converted model: the error says what to pass
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        asyncio.run(run())


def test_multi_turn_sends_the_real_answers(qwen):
    convs = [Conversation(f"c{i}", "be brief", 2, ("hi", "and?", "bye"), (1, 2, 1), (2, 2, 2))
             for i in range(2)]
    fake = FakeOpenAI()
    result = asyncio.run(run_against_fake(fake, Workload(conversations=convs), qwen,
                                          backend="openai-chat", model="m"))
    assert (result.completed, result.failed) == (6, 0)
    last_turns = [b["messages"] for b in fake.bodies if len(b["messages"]) == 6]
    assert len(last_turns) == 2
    roles = [m["role"] for m in last_turns[0]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert last_turns[0][2]["content"] == "answer2-0 answer2-1 "  # the model's actual reply
    assert last_turns[0][4]["content"] == "answer4-0 answer4-1 "
    assert fake.bodies[0]["max_completion_tokens"] == 2
    assert result.mean_ttft_ms_by_turn is not None and len(result.mean_ttft_ms_by_turn) == 3


def test_multi_turn_failure_skips_later_turns(qwen):
    conv = Conversation("c", "", 0, ("hi", "fail", "bye"), (1, 1, 1), (1, 1, 1))
    fake = FakeOpenAI()
    result = asyncio.run(run_against_fake(fake, Workload(conversations=[conv]), qwen,
                                          backend="openai-chat", model="m"))
    assert (result.completed, result.failed) == (1, 2)
    assert "skipped" in result.per_request["errors"][2]


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A real TCP server that accepts every connection, reads, and never answers."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def test_the_ready_check_gives_up_at_its_timeout_on_a_server_that_never_answers(qwen):
    """vLLM's ready check bounds the request in flight too: a server that accepts and never
    answers fails it after --ready-check-timeout-sec, not after the 6-hour request timeout."""
    async def go() -> tuple[BaseException, float]:
        async with silent_server() as url:
            config = BenchConfig(base_url=url, model="m", ready_check_timeout_sec=1)
            start = time.perf_counter()
            with pytest.raises(RuntimeError) as caught:
                await asyncio.wait_for(run_benchmark(config, tokenizer=qwen,
                                                     workload=requests("a")), 4)
            return caught.value, time.perf_counter() - start

    error, took = asyncio.run(go())
    assert str(error) == ("the test request to /v1/completions got no answer within 1 s "
                          "(--ready-check-timeout-sec 1)")
    assert took < 2.5


def test_the_initial_test_request_gives_up_on_a_server_that_never_answers(qwen):
    """Without a ready check the one-try initial test waits INITIAL_TEST_TIMEOUT_S (vLLM's
    default ready-check timeout, 600 s), not the whole request timeout."""
    async def go() -> BaseException:
        async with silent_server() as url:
            config = BenchConfig(base_url=url, model="m")
            with pytest.raises(RuntimeError) as caught:
                await asyncio.wait_for(run_benchmark(
                    config, tokenizer=qwen, workload=requests("a"), initial_test=True,
                    initial_test_timeout_s=0.5), 4)
            return caught.value

    assert str(asyncio.run(go())) == (
        "the initial test request to /v1/completions got no answer within 0.5 s (vLLM's "
        "default wait; set it with --ready-check-timeout-sec)")
    assert INITIAL_TEST_TIMEOUT_S == 600


def test_a_ready_check_against_an_answering_server_sends_one_probe_then_the_run(qwen):
    fake = FakeOpenAI()
    result = asyncio.run(run_against_fake(fake, requests("a", "b"), qwen,
                                          ready_check_timeout_sec=5, model="m"))
    assert (result.completed, result.failed) == (2, 0)
    assert [b["prompt"] for b in fake.bodies] == ["a", "a", "b"]  # the probe is the first


def test_config_validation_and_derived_values():
    with pytest.raises(ValueError):
        BenchConfig(backend="tgi")
    with pytest.raises(ValueError):
        BenchConfig(goodput=("itl:5",))
    with pytest.raises(ValueError):
        BenchConfig(percentile_metrics="ttft,foo")
    with pytest.raises(TypeError):
        BenchConfig(random_input_length=5)  # type: ignore[call-arg]  # unknown option
    chat = BenchConfig(backend="openai-chat", port=9000)
    assert chat.api_url == "http://127.0.0.1:9000/v1/chat/completions" and chat.is_chat
    assert BenchConfig(dataset_name="random").effective_ignore_eos
    assert not BenchConfig(dataset_name="sharegpt").effective_ignore_eos
    assert BenchConfig(metric_percentiles="50,99.9").percentiles == [50.0, 99.9]
    assert BenchConfig(long_doc_qa_hit_miss_ratio="3:1").hit_miss_ratio == (3, 1)


def test_build_workload_maps_vllm_options(qwen):
    work = build_workload(BenchConfig(dataset_name="prefix_repetition", num_prompts=10,
                                      prefix_repetition_prefix_len=16,
                                      prefix_repetition_suffix_len=8,
                                      prefix_repetition_num_prefixes=2, output_len=7), qwen)
    assert [r.request_id for r in work.requests] == [f"bench-{i}" for i in range(10)]
    assert {r.expected_output_len for r in work.requests} == {7}  # --output-len overrides
    work = build_workload(BenchConfig(dataset_name="random", num_prompts=3, input_len=32,
                                      random_output_len=4), qwen)
    assert [r.prompt_len for r in work.requests] == [32, 32, 32]
    work = build_workload(BenchConfig(dataset_name="multi_turn", num_prompts=2,
                                      multi_turn_num_turns=2, multi_turn_system_prompt_len=8,
                                      multi_turn_input_len=4), qwen)
    assert work.num_measured == 4
    work = build_workload(BenchConfig(dataset_name="long_doc_qa", long_doc_qa_num_documents=2,
                                      long_doc_qa_document_length=16), qwen)
    assert (len(work.requests), len(work.warmup_requests)) == (4, 2)
