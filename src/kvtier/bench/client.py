"""The benchmark client: `BenchConfig` (vLLM's option names) and `run_benchmark` over HTTP.

Talks only to OpenAI-compatible `/v1/completions` and `/v1/chat/completions` with `stream: true`
and `stream_options.include_usage`, so it measures kvtier, vLLM or SGLang alike. Traffic follows
`vllm bench serve`: arrivals all at t=0 (rate inf) or gamma-distributed gaps (burstiness 1 =
Poisson) rescaled to end at n/rate, a max-concurrency semaphore, warm-ups excluded from the
figures. Every HTTP error, connection error or timeout becomes a failed request; the run goes on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import numpy as np

from kvtier.bench.config import BenchConfig, build_workload
from kvtier.bench.datasets import Conversation, SampleRequest, TokenizerLike, Workload
from kvtier.bench.metrics import BenchmarkResult, RequestFuncOutput, compute_result, stats_ms
from kvtier.bench.prometheus import diff_samples, scrape_metrics
from kvtier.bench.sse import SSEParser, StreamRecorder
from kvtier.bench.tokenizer import resolve_tokenizer

ProgressFn = Callable[[int, int], None]
"""Called as progress(num_finished, num_total) as measured requests finish."""
Messages = list[dict[str, str]]


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start, as vLLM's client draws them.

    Gaps are Gamma(shape=burstiness, scale=1/(rate·burstiness)) — exponential at burstiness 1 —
    and their running sum is rescaled so the last request leaves at exactly n / rate. They come
    from numpy's legacy generator seeded with `seed`, the stream vLLM draws them from after its
    `np.random.seed(seed)`: the same gaps wherever its dataset draws nothing from that stream
    (ShareGPT, random). Its prefix_repetition dataset draws from it first, so there the gaps
    differ (the distribution does not).
    """
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        gaps = np.random.RandomState(seed).gamma(
            shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    times = np.cumsum(gaps)
    if times[-1] != 0:
        times *= (num_requests / request_rate) / times[-1]
    return times.tolist()


def render_transcript(messages: Messages) -> str:
    """A plain-text chat transcript for /v1/completions (no chat template involved)."""
    turns = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "assistant:"])


class _Session:
    """One run's HTTP state: where to send, what to add to every payload, the semaphore."""

    def __init__(self, config: BenchConfig, http: aiohttp.ClientSession, model: str) -> None:
        self.config = config
        self.http = http
        self.model = model
        self.semaphore = asyncio.Semaphore(config.max_concurrency or 1_000_000_000)
        self.headers = base_headers(config)
        self.progress: ProgressFn | None = None
        self.finished = 0
        self.total = 0

    def payload(self, prompt: str | list[int] | Messages, max_tokens: int) -> dict[str, Any]:
        """The request body: vLLM's fields plus sampling options and `extra_body` (wins)."""
        body: dict[str, Any] = {"model": self.model, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.config.is_chat:
            messages = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
            body.update(messages=messages, max_completion_tokens=max_tokens,
                        max_tokens=max_tokens)
        else:
            text = render_transcript(prompt) if _is_messages(prompt) else prompt
            body.update(prompt=text, max_tokens=max_tokens)
        if self.config.effective_ignore_eos:
            body["ignore_eos"] = True
        body.update(self.config.sampling_params)
        body.update(self.config.extra_body or {})
        return body

    async def send(self, prompt: str | list[int] | Messages, prompt_len: int, max_tokens: int,
                   request_id: str | None) -> RequestFuncOutput:
        """Send one streamed request under the semaphore; never raises for network trouble."""
        async with self.semaphore:
            out = await stream_request(self.http, self.config.api_url,
                                       self.payload(prompt, max_tokens),
                                       self._headers_for(request_id), prompt_len)
        out.request_id = request_id
        return out

    def _headers_for(self, request_id: str | None) -> dict[str, str]:
        return {**self.headers, "x-request-id": request_id} if request_id else self.headers

    def count(self, num: int = 1) -> None:
        self.finished += num
        if self.progress is not None:
            self.progress(self.finished, self.total)

    async def one(self, sample: SampleRequest) -> RequestFuncOutput:
        out = await self.send(sample.prompt, sample.prompt_len, sample.expected_output_len,
                              sample.request_id)
        self.count()
        return out

    async def conversation(self, conv: Conversation) -> list[RequestFuncOutput]:
        """Send the turns in order, each with the real answers so far; a failure skips the rest."""
        messages: Messages = ([{"role": "system", "content": conv.system_prompt}]
                              if conv.system_prompt else [])
        history_len = conv.system_prompt_len
        outputs: list[RequestFuncOutput] = []
        for turn in range(conv.num_turns):
            messages.append({"role": "user", "content": conv.user_turns[turn]})
            history_len += conv.user_turn_lens[turn]
            out = await self.send(list(messages), history_len, conv.output_lens[turn],
                                  f"{conv.conversation_id}-turn{turn}")
            out.turn_index = turn
            outputs.append(out)
            self.count()
            if not out.success:
                break
            messages.append({"role": "assistant", "content": out.generated_text})
            history_len += out.output_tokens or 0
        for turn in range(len(outputs), conv.num_turns):
            outputs.append(RequestFuncOutput(error="skipped: an earlier turn failed",
                                         turn_index=turn))
            self.count()
        return outputs


def base_headers(config: BenchConfig) -> dict[str, str]:
    """JSON content type, the configured extra headers, and the bearer token if any."""
    headers = {"Content-Type": "application/json", **(config.header or {})}
    if config.resolved_api_key:
        headers["Authorization"] = f"Bearer {config.resolved_api_key}"
    return headers


def _is_messages(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


async def stream_request(http: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                         headers: dict[str, str], prompt_len: int) -> RequestFuncOutput:
    """POST one streaming request and record it; any failure is returned, not raised."""
    start = time.perf_counter()
    recorder = StreamRecorder(start_time=start, chat="chat/completions" in url)
    parser = SSEParser()
    try:
        async with http.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                body = (await response.text())[:500]
                return RequestFuncOutput(prompt_len=prompt_len, start_time=start, error=(
                    f"HTTP {response.status} {response.reason}: {body}"))
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                for event in parser.feed(chunk):
                    recorder.on_event(event, now)
            for event in parser.finish():
                recorder.on_event(event, time.perf_counter())
    except Exception as exc:  # the run goes on: every failure is a failed request
        return RequestFuncOutput(prompt_len=prompt_len, start_time=start,
                             error=f"{type(exc).__name__}: {exc}")
    return recorder.result(prompt_len)


async def first_model(http: aiohttp.ClientSession, base_url: str,
                      headers: dict[str, str]) -> str:
    """The id of the first model the server lists at /v1/models."""
    async with http.get(f"{base_url}/v1/models", headers=headers) as response:
        response.raise_for_status()
        data = (await response.json()).get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"])


async def _gather_after_schedule(items: Sequence[Any], times: Sequence[float],
                                 launch: Callable[[Any], Any]) -> list[Any]:
    """Start `launch(item)` at each item's offset from now; wait for all to finish."""
    start = time.perf_counter()
    tasks = []
    for item, offset in zip(items, times, strict=True):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(launch(item)))
    return list(await asyncio.gather(*tasks))


async def _bounded(session: _Session, prompt: str | list[int] | Messages, prompt_len: int,
                   max_tokens: int, timeout_s: float) -> RequestFuncOutput | None:
    """One request that may take at most `timeout_s` (None when it has not finished by then,
    the request then cancelled): the session's own timeout is the whole run's, hours long."""
    try:
        return await asyncio.wait_for(session.send(prompt, prompt_len, max_tokens, None),
                                      timeout_s)
    except TimeoutError:
        return None


async def _ready_check(session: _Session, probe: SampleRequest, timeout_s: float) -> None:
    """Retry the first request until it succeeds (server still starting) or time runs out.

    As vLLM's ready check: `timeout_s` bounds the whole wait, the request in flight included,
    so a server that accepts the connection and never answers fails it at the timeout."""
    path = session.config.api_url.removeprefix(session.config.root_url)
    deadline = time.perf_counter() + timeout_s
    error = "no answer"
    while (left := deadline - time.perf_counter()) > 0:
        out = await _bounded(session, probe.prompt, probe.prompt_len, probe.expected_output_len,
                             left)
        if out is None:
            raise RuntimeError(f"the test request to {path} got no answer within {timeout_s:g} s "
                               f"(--ready-check-timeout-sec {timeout_s:g})")
        if out.success:
            return
        error = out.error
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.perf_counter())))
    raise RuntimeError(f"endpoint {path} not ready after {timeout_s:g} s "
                       f"(--ready-check-timeout-sec): {_one_line(error)}")


TEST_PROMPT = "Hello, my name is"
"""The initial test request's prompt: its own, so no workload prompt is cached before the run."""

INITIAL_TEST_TIMEOUT_S = 600.0
"""How long the one-try initial test request may go unanswered: vLLM's default
`--ready-check-timeout-sec`, the bound its users get when they give none."""


async def _initial_test(session: _Session, first: SampleRequest,
                        timeout_s: float = INITIAL_TEST_TIMEOUT_S) -> None:
    """vLLM's initial test run, tried once: one short request of the run's shape (endpoint,
    model, headers, sampling, extra body, the first request's max_tokens) must succeed
    before any load is sent, so a wrong endpoint, model or server fails in seconds rather
    than after every request has failed; one with no answer fails after `timeout_s`."""
    path = session.config.api_url.removeprefix(session.config.root_url)
    out = await _bounded(session, TEST_PROMPT, 0, first.expected_output_len, timeout_s)
    if out is None:
        raise RuntimeError(f"the initial test request to {path} got no answer within "
                           f"{timeout_s:g} s (vLLM's default wait; set it with "
                           "--ready-check-timeout-sec)")
    if not out.success:
        raise RuntimeError(f"the initial test request to {path} failed: "
                           f"{_one_line(out.error)} (check --model, --endpoint and --backend)")


def _one_line(error: str, limit: int = 300) -> str:
    """A request's error as one line (an HTML error page's lines joined), cut at `limit`."""
    text = " ".join((error or "no answer").split())
    return text if len(text) <= limit else text[:limit] + "…"


def _first_sample(workload: Workload) -> SampleRequest:
    if workload.requests:
        return workload.requests[0]
    conv = workload.conversations[0]
    return SampleRequest(conv.user_turns[0], conv.user_turn_lens[0], conv.output_lens[0])


async def _warm_up(session: _Session, workload: Workload) -> dict[str, Any] | None:
    """vLLM's `num_warmups` copies of the first request, then the workload's warm-up round."""
    probe = _first_sample(workload)
    samples = [probe] * session.config.num_warmups + list(workload.warmup_requests)
    if not samples:
        return None
    outputs = await asyncio.gather(*(session.send(
        s.prompt, s.prompt_len, s.expected_output_len, s.request_id) for s in samples))
    ok = [o for o in outputs if o.success]
    return {"completed": len(ok), "failed": len(outputs) - len(ok),
            "mean_ttft_ms": stats_ms([o.ttft for o in ok], ())["mean"]}


async def _measure(session: _Session,
                   workload: Workload) -> tuple[list[RequestFuncOutput], float]:
    """The measured phase: (outputs in workload order, seconds from dispatch to last finish)."""
    config = session.config
    session.total = workload.num_measured
    session.count(0)
    start = time.perf_counter()
    if workload.conversations:
        times = arrival_times(len(workload.conversations), config.request_rate,
                              config.burstiness, config.seed)
        per_conv = await _gather_after_schedule(workload.conversations, times,
                                                session.conversation)
        outputs = [o for conv_outputs in per_conv for o in conv_outputs]
    else:
        times = arrival_times(len(workload.requests), config.request_rate, config.burstiness,
                              config.seed)
        outputs = await _gather_after_schedule(workload.requests, times, session.one)
    return outputs, time.perf_counter() - start


async def run_benchmark(config: BenchConfig, progress: ProgressFn | None = None, *,
                        tokenizer: TokenizerLike | None = None,
                        workload: Workload | None = None,
                        initial_test: bool = False,
                        initial_test_timeout_s: float = INITIAL_TEST_TIMEOUT_S,
                        ) -> BenchmarkResult:
    """Run one benchmark against `config.base_url` and return its figures.

    `tokenizer` and `workload` default to `resolve_tokenizer(config.tokenizer, model)` (which
    also finds kvtier's embedded model's tokenizer) and `build_workload(config, tokenizer)`.
    Raises only for setup failures (no model listed, no tokenizer found, endpoint not ready
    within `ready_check_timeout_sec`, or with `initial_test` and no ready check, a failed
    initial test request, or one unanswered after `initial_test_timeout_s`); request failures
    are counted.
    """
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        model = config.model or await first_model(http, config.root_url, base_headers(config))
        session = _Session(config, http, config.served_model_name or model)
        tokenizer = tokenizer or resolve_tokenizer(config.tokenizer, model)
        workload = workload or build_workload(config, tokenizer)
        if config.ready_check_timeout_sec > 0:
            await _ready_check(session, _first_sample(workload), config.ready_check_timeout_sec)
        elif initial_test:
            await _initial_test(session, _first_sample(workload), initial_test_timeout_s)
        warmup = await _warm_up(session, workload)
        before = await scrape_metrics(http, config.root_url) if config.scrape_metrics else None
        session.progress = progress
        outputs, duration = await _measure(session, workload)
        after = await scrape_metrics(http, config.root_url) if before is not None else None
    result = compute_result(outputs, duration, tokenizer, config.percentiles, config.goodput_slos)
    result.num_prompts, result.request_rate = config.num_prompts, config.request_rate
    result.burstiness, result.max_concurrency = config.burstiness, config.max_concurrency
    result.warmup = warmup
    result.server_metrics = diff_samples(before, after) if before and after else None
    result.metadata = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"),
                       "endpoint_type": config.backend, "backend": config.backend,
                       "label": config.label or config.backend, "model_id": model,
                       "tokenizer_id": config.tokenizer or model,
                       "dataset_name": config.dataset_name}
    return result
