"""`kvtier serve` as a real subprocess on 127.0.0.1, driven over HTTP.

One server process serves most tests (module fixture); the queue/auth tests and the SIGTERM
test start their own with the flags they need. Model: `random:tiny-llama` with a 256-token
context, so a request without max_tokens stays short and the fuzz stays fast. Greedy text is
compared with the offline `kvtier.LLM` built with the same engine arguments.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvtier import LLM, SamplingParams

pytestmark = pytest.mark.slow

MODEL = "random:tiny-llama"
MAX_MODEL_LEN = 256
NUM_BLOCKS = 1024  # a small pool: allocating the default 2 GiB would dominate start-up
ENGINE_FLAGS = ["--model", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                "--num-gpu-blocks-override", str(NUM_BLOCKS)]
READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+)")
GREEDY = {"temperature": 0.0}


class ServerProcess:
    """`python -m kvtier.cli serve` on a free port; stderr is collected by a thread."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None,
                 new_session: bool = False) -> None:
        """`new_session`: a process group of its own, which the test may signal whole."""
        command = [sys.executable, "-m", "kvtier.cli", "--log-level", "INFO", "serve",
                   *ENGINE_FLAGS, "--port", "0", *flags]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=new_session)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(180) or not self.url:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.url = match.group(1)
                self.ready.set()
        self.ready.set()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def metrics(url: str) -> dict[str, float]:
    """/metrics keyed `name{label=value,...}`, leaving out the model_name label, which must
    be on every series and name the served model (as vLLM's)."""
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            others = dict(sample.labels)
            assert others.pop("model_name", None) == MODEL, sample
            labels = ",".join(f"{k}={v}" for k, v in sorted(others.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def finished_total(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("kvtier:request_success_total"))


def wait_idle(url: str, timeout: float = 20) -> dict[str, float]:
    """Metrics once nothing runs or waits and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["kvtier:num_requests_running"] == 0 and m["kvtier:num_requests_waiting"] == 0
        if idle and m["kvtier:kv_cache_free_blocks"] == m["kvtier:kv_cache_total_blocks"]:
            return m
        assert time.monotonic() < deadline, f"server never went idle: {m}"
        time.sleep(0.05)


def parse_sse(body: str) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of an SSE body and whether it ended with `data: [DONE]`."""
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = [block.removeprefix("data: ") for block in body.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in body.split("\n\n") if block)
    return [json.loads(e) for e in events[:-1]], events[-1] == "[DONE]"


def spawned_children(pid: int) -> list[int]:
    """The processes `pid` spawned with multiprocessing (not its resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    proc = ServerProcess("--max-request-body-bytes", "65536")
    yield proc
    assert proc.stop() == 0, "".join(proc.lines[-30:])


@pytest.fixture(scope="module")
def server(server_process: ServerProcess) -> str:
    return server_process.url


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=NUM_BLOCKS)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


FRONT_END_FROZE = re.compile(r"gc: froze (\d+) start-up objects \(front end\)")


def test_the_front_end_freezes_its_start_up_heap(server_process: ServerProcess) -> None:
    """The tokenizer, the app and their libraries are out of the collector's full passes,
    which would otherwise stall every stream for each walk over them (as vLLM's API server
    freezes)."""
    frozen = [int(m.group(1)) for line in server_process.lines
              if (m := FRONT_END_FROZE.search(line))]
    assert len(frozen) == 1, "".join(server_process.lines[-30:])
    assert frozen[0] > 50_000  # the imports alone: far more than an empty interpreter's
    deferred = [line for line in server_process.lines
                if "gc: full passes wait for an idle moment (or 1000 middle passes)" in line]
    assert len(deferred) == 1, "".join(server_process.lines[-30:])


# -- 1. the official client; text equals the offline API -------------------------------------


def test_openai_client_completions_match_offline(client: openai.OpenAI, llm: LLM) -> None:
    prompt = "The quick brown fox jumps over the lazy dog because"
    expected = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0))[0]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    assert response.choices[0].text == expected.outputs[0].text
    assert response.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12

    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12

    token_ids = list(range(1000, 1040))
    expected_ids = llm.generate([token_ids], SamplingParams(max_tokens=8, temperature=0.0))[0]
    for cached in (0, 32):  # the second time, both full 16-token blocks are prefix-cache hits
        by_ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=8,
                                           **GREEDY)
        assert by_ids.choices[0].text == expected_ids.outputs[0].text
        assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 40
        assert by_ids.usage.prompt_tokens_details.cached_tokens == cached


def test_openai_client_chat_matches_offline(client: openai.OpenAI, llm: LLM) -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three colours of the rainbow."}]
    expected = llm.chat(messages, SamplingParams(max_tokens=10, temperature=0.0))[0]
    response = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore
                                              max_completion_tokens=10, **GREEDY)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore
                                            max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.outputs[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == expected.outputs[0].finish_reason and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_continues_a_begun_answer_like_the_offline_engine(client: openai.OpenAI,
                                                              llm: LLM) -> None:
    # vLLM's continue_final_message: the model continues the assistant's begun answer.
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    expected = llm.chat(messages, greedy, add_generation_prompt=False,
                        continue_final_message=True)[0]
    opened = llm.chat(messages, greedy)[0]  # the same messages, a new turn opened
    assert expected.prompt_token_ids != opened.prompt_token_ids
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=6,  # type: ignore[arg-type]
        extra_body={"add_generation_prompt": False, "continue_final_message": True}, **GREEDY)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_models_health_version_and_request_id(server: str) -> None:
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 256
    assert httpx.get(f"{server}/health").status_code == 200
    assert "version" in httpx.get(f"{server}/version").json()
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    response = httpx.post(f"{server}/v1/completions", headers={"x-request-id": "trace-7"},
                          json={"prompt": "hi", "max_tokens": 2})
    assert response.headers["x-request-id"] == "trace-7"
    assert response.json()["id"] == "cmpl-trace-7"


def test_n_choices_match_offline_requests_seeded_one_apart(client: openai.OpenAI,
                                                           llm: LLM) -> None:
    prompt = "The weather today is"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, n=3,
                                         temperature=1.0, seed=11)
    texts = [choice.text for choice in sorted(response.choices, key=lambda c: c.index)]
    offline = [llm.generate([prompt], SamplingParams(max_tokens=10, temperature=1.0,
                                                     seed=11 + i))[0].outputs[0]
               for i in range(3)]
    assert texts == [o.text for o in offline] and len(set(texts)) > 1
    assert response.usage is not None  # the prompt once, every choice's tokens
    assert response.usage.completion_tokens == sum(len(o.token_ids) for o in offline)
    assert response.usage.prompt_tokens == len(llm.get_tokenizer().encode(prompt))


def test_a_batch_of_prompts_answers_each_prompt_as_alone(client: openai.OpenAI, server: str,
                                                        llm: LLM) -> None:
    # OpenAI's batch: prompt i's choice j is choice i * n + j (vLLM's order); usage counts
    # every prompt once.
    prompts = ["The capital of France is", "Once upon a time"]
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    offline = [llm.generate(prompt, greedy)[0] for prompt in prompts]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2,
                                         **GREEDY)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert texts == [o.outputs[0].text for o in offline for _ in range(2)]
    assert response.usage is not None
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in offline)
    assert response.usage.completion_tokens == 4 * 6

    stream = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2,
                                       stream=True, stream_options={"include_usage": True},
                                       echo=True, **GREEDY)
    chunks = list(stream)
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(4)]
    assert streamed == [p + o.outputs[0].text for p, o in zip(prompts, offline, strict=True)
                        for _ in range(2)]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == \
        response.usage.prompt_tokens

    ids = [list(range(1000, 1020)), list(range(2000, 2030))]
    by_ids = httpx.post(f"{server}/v1/completions", json={
        "prompt": ids, "max_tokens": 4, "temperature": 0.0}).json()
    expected = [llm.generate([i], SamplingParams(max_tokens=4, temperature=0.0))[0]
                for i in ids]
    assert [c["text"] for c in by_ids["choices"]] == [e.outputs[0].text for e in expected]
    assert by_ids["usage"]["prompt_tokens"] == 50


def test_special_tokens_stay_in_the_text_when_asked(client: openai.OpenAI, llm: LLM) -> None:
    # vLLM's skip_special_tokens false: a special token the model writes (forced here by a
    # bias) is spelled out in the text; by default it is left out.
    tokenizer = llm.get_tokenizer()
    special = min(tokenizer.special_token_ids - set(tokenizer.eos_token_ids))
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0.0,
            "logit_bias": {str(special): 100}}
    spelled = tokenizer.decode([special], skip_special_tokens=False)
    kept = client.completions.create(model=MODEL, **body,  # type: ignore[arg-type]
                                     extra_body={"skip_special_tokens": False,
                                                 "ignore_eos": True})
    assert kept.choices[0].text == spelled * 3 and spelled
    skipped = client.completions.create(model=MODEL, **body,  # type: ignore[arg-type]
                                        extra_body={"ignore_eos": True})
    assert skipped.choices[0].text == ""
    offline = llm.generate(["Hello"], SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias={special: 100.0},
        skip_special_tokens=False))[0].outputs[0]
    assert offline.text == kept.choices[0].text and offline.token_ids == [special] * 3


def test_bad_words_leave_the_greedy_answer(client: openai.OpenAI, llm: LLM) -> None:
    # vLLM's bad_words over HTTP (SmolLM2's real tokenizer): the greedy answer's first word,
    # banned, is not in the new answer, which is what the offline engine gives.
    prompt = "The capital of France is"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, **GREEDY)
    word = free.choices[0].text.split()[0]
    steered = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                        extra_body={"bad_words": [word]}, **GREEDY)
    assert word not in steered.choices[0].text.split()
    offline = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                    bad_words=[word]))[0].outputs[0]
    assert offline.text == steered.choices[0].text


def test_truncated_prompts_run_their_last_tokens(client: openai.OpenAI, llm: LLM) -> None:
    prompt = "Far away, behind the word mountains, far from the countries Vokalia and"
    ids = llm.get_tokenizer().encode(prompt)
    expected = llm.generate([ids[-8:]], SamplingParams(max_tokens=5, temperature=0.0))[0]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                         extra_body={"truncate_prompt_tokens": 8}, **GREEDY)
    assert response.choices[0].text == expected.outputs[0].text
    assert response.usage is not None and response.usage.prompt_tokens == 8


def test_penalised_sampling_over_http_matches_offline(client: openai.OpenAI, llm: LLM) -> None:
    prompt = "one two one two one two"
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0.0, presence_penalty=1.0,
        frequency_penalty=0.5, extra_body={"repetition_penalty": 1.4, "ignore_eos": True})
    offline = llm.generate([prompt], SamplingParams(
        max_tokens=12, temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5,
        repetition_penalty=1.4, ignore_eos=True))[0].outputs[0].text
    assert response.choices[0].text == offline


def test_logit_bias_and_allowed_ids_over_http_steer_like_the_offline_engine(client: openai.OpenAI,
                                                             llm: LLM) -> None:
    # A +100 bias makes its token every output token; a -100 bias on the greedy choice
    # changes the text as the offline engine's does; the logprobs stay the model's own.
    prompt = "The capital of France is"
    forced = llm.get_tokenizer().encode(" Paris", add_special_tokens=False)[0]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                         temperature=0.0, logit_bias={str(forced): 100},
                                         logprobs=1, extra_body={"ignore_eos": True})
    assert response.choices[0].text == llm.get_tokenizer().decode([forced] * 4)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.token_logprobs[1] < -1.0  # "Paris Paris": unlikely to the model itself
    plain = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0]
    banned = plain.outputs[0].token_ids[0]
    steered = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                        temperature=0.0, logit_bias={str(banned): -100})
    offline = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                    logit_bias={banned: -100.0}))[0]
    assert steered.choices[0].text == offline.outputs[0].text
    assert offline.outputs[0].token_ids[0] != banned
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                  logit_bias={str(10**7): 5})
    # vLLM's allowed_token_ids: the output holds nothing else, as offline.
    allowed = llm.get_tokenizer().encode(" yes no maybe", add_special_tokens=False)
    limited = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                        temperature=0.0, extra_body={
                                            "allowed_token_ids": allowed, "ignore_eos": True})
    offline = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0,
                                                    allowed_token_ids=tuple(allowed),
                                                    ignore_eos=True))[0]
    assert set(offline.outputs[0].token_ids) <= set(allowed)
    assert limited.choices[0].text == offline.outputs[0].text
    eos = llm.get_tokenizer().eos_token_id
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, extra_body={
            "allowed_token_ids": [eos], "min_tokens": 1})


def test_logprobs_over_http_equal_the_offline_engines(client: openai.OpenAI, llm: LLM) -> None:
    prompt = "The weather today is"
    offline = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, logprobs=3,
                                                    ignore_eos=True))[0].outputs[0]
    assert offline.logprobs is not None
    tokenizer = llm.get_tokenizer()
    names = [tokenizer.decode([t], skip_special_tokens=False) for t in offline.token_ids]

    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=3,
                                         extra_body={"ignore_eos": True}, **GREEDY)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == names
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in offline.logprobs],
                                                    abs=1e-4)
    assert logprobs.top_logprobs is not None and all(len(top) in (3, 4)
                                                     for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(map(len, names[:i])) for i in range(8)]
    sampled = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, logprobs=1,
                                        temperature=2.0, seed=3,
                                        extra_body={"ignore_eos": True}).choices[0].logprobs
    assert sampled is not None and sampled.tokens and sampled.top_logprobs
    for token, top in zip(sampled.tokens, sampled.top_logprobs, strict=True):
        assert top is not None and token in top and len(top) in (1, 2)
    assert any(len(top or {}) == 2 for top in sampled.top_logprobs)  # sampled off the top 1
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=3,
                                         stream=True, extra_body={"ignore_eos": True}, **GREEDY)
    chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens or []] == names
    assert [o for c in chunks for o in c.text_offset or []] == logprobs.text_offset

    messages = [{"role": "user", "content": "Say something."}]
    chat_offline = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0.0, logprobs=2,
                                                     ignore_eos=True))[0].outputs[0]
    assert chat_offline.logprobs is not None
    chat = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore
                                          max_tokens=6, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True}, **GREEDY)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for entry, expected in zip(content, chat_offline.logprobs, strict=True):
        assert entry.logprob == pytest.approx(expected.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            [lp for _, lp in expected.top], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled one is top
    stream = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore
                                            max_tokens=6, logprobs=True, stream=True,
                                            extra_body={"ignore_eos": True}, **GREEDY)
    streamed_content = [e for c in stream if c.choices and c.choices[0].logprobs
                        for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in streamed_content] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in streamed_content)  # top_logprobs not asked
    plain = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore
                                           max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_echo_and_prompt_logprobs_score_the_prompt_like_the_offline_engine(
        server: str, client: openai.OpenAI, llm: LLM) -> None:
    # What evaluation harnesses send to score a text (lm-eval's loglikelihood): echo, logprobs
    # 1 and one token; the prompt's tokens lead the logprobs, the first with null.
    prompt = "Paris is the capital of France"
    offline = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                    prompt_logprobs=1, logprobs=1))[0]
    assert offline.prompt_logprobs is not None
    tokenizer = llm.get_tokenizer()
    ids = offline.prompt_token_ids
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True,
                                         logprobs=1, temperature=0.0)
    choice = response.choices[0]
    assert choice.text == prompt + offline.outputs[0].text
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.tokens == [tokenizer.decode([t], skip_special_tokens=False)
                               for t in [*ids, *offline.outputs[0].token_ids]]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # type: ignore
    assert logprobs.token_logprobs[1:len(ids)] == pytest.approx(
        [e.logprob for e in offline.prompt_logprobs[1:]], abs=1e-4)  # type: ignore[union-attr]

    body = httpx.post(f"{server}/v1/completions", json={
        "prompt": ids, "max_tokens": 2, "prompt_logprobs": 2, "temperature": 0.0}).json()
    field = body["choices"][0]["prompt_logprobs"]
    assert len(field) == len(ids) and field[0] is None
    for token, entry, expected in zip(ids[1:], field[1:], offline.prompt_logprobs[1:],
                                      strict=True):
        assert str(token) in entry and len(entry) in (2, 3)
        assert entry[str(token)]["logprob"] == pytest.approx(expected.logprob, abs=1e-4)
        assert entry[str(token)]["rank"] == expected.rank
    text = body["choices"][0]["text"]  # no echo: the output alone
    assert text.startswith(offline.outputs[0].text) and not text.startswith(prompt)

    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                       logprobs=0, temperature=0.0)  # score only, generate none
    assert scored.choices[0].text == prompt and scored.choices[0].logprobs is not None
    assert scored.choices[0].logprobs.token_logprobs == [None, *logprobs.token_logprobs[1:len(ids)]]
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    streamed_score = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, stream=True, temperature=0.0))
    assert "".join(c.choices[0].text for c in streamed_score if c.choices) == prompt

    special = min(tokenizer.special_token_ids)  # echoed as given: special tokens kept
    echoed = httpx.post(f"{server}/v1/completions", json={
        "prompt": [special, *ids], "max_tokens": 1, "echo": True, "temperature": 0.0}).json()
    assert echoed["choices"][0]["text"].startswith(
        tokenizer.decode([special, *ids], skip_special_tokens=False))

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                            echo=True, stream=True, temperature=0.0))
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith(
        prompt + offline.outputs[0].text)


def test_tokenize_and_detokenize_agree_with_generation(server: str) -> None:
    # vLLM's /tokenize and /detokenize over the real tokenizer: the ids are those a completion
    # and a chat request run (their usage counts them), and decoding gives the text back.
    text = "The quick brown fox jumps over the lazy dog."
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": text}).json()
    usage = httpx.post(f"{server}/v1/completions",
                       json={"prompt": text, "max_tokens": 1}).json()["usage"]
    assert tokens["count"] == usage["prompt_tokens"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    rendered = httpx.post(f"{server}/tokenize", json={"messages": messages}).json()
    usage = httpx.post(f"{server}/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 1}).json()["usage"]
    assert rendered["count"] == usage["prompt_tokens"]
    bare = httpx.post(f"{server}/tokenize", json={"prompt": text, "add_special_tokens": False,
                                                  "return_token_strs": True}).json()
    assert len(bare["token_strs"]) == bare["count"]
    back = httpx.post(f"{server}/detokenize", json={"tokens": bare["tokens"]}).json()
    assert back == {"prompt": text}


def test_tools_with_tool_choice_none_are_read_not_called(server: str) -> None:
    # As in vLLM: with tool_choice "none" the tools render into the prompt (the ids /tokenize
    # gives) and the answer is plain text; any other choice needs a tool-call parser (400).
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    # (SmolLM2's template ignores tools; the fake engine's test shows them rendered.)
    rendered = httpx.post(f"{server}/tokenize", json={"messages": USER, "tools": tools}).json()
    chat = httpx.post(f"{server}/v1/chat/completions", json={
        "messages": USER, "tools": tools, "tool_choice": "none", "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == rendered["count"]
    assert isinstance(chat.json()["choices"][0]["message"]["content"], str)
    auto = httpx.post(f"{server}/v1/chat/completions", json={
        "messages": USER, "tools": tools, "tool_choice": "auto", "max_tokens": 2})
    assert auto.status_code == 400 and auto.json()["error"]["param"] == "tools"


# -- 2. 64 concurrent streams; metrics match --------------------------------------------------


async def _stream_completion(http: httpx.AsyncClient, url: str, prompt: Any,
                             max_tokens: int) -> tuple[str, dict[str, Any]]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        raw = (await response.aread()).decode()
    events, _ = parse_sse(raw)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    return text, events[-1]["usage"]


def test_streams_cut_by_stop_strings_send_the_non_streamed_text(server: str) -> None:
    # A stop string cuts text the engine held back; concurrent streams may fall behind and
    # get steps merged: either way each stream's text is the non-streamed answer's.
    base = {"model": MODEL, "prompt": "The weather today is", "max_tokens": 24,
            "ignore_eos": True, **GREEDY}
    free = httpx.post(f"{server}/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(free) >= 16
    cases = [{"stop": [stop, "\x07" * 6], "include_stop_str_in_output": include}
             for stop in (free[4:7], free[10:14]) for include in (False, True)]
    expected = []
    for case in cases:
        choice = httpx.post(f"{server}/v1/completions", json={**base, **case}).json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] == case["stop"][0]
        expected.append((choice["text"], choice["stop_reason"]))

    async def stream(http: httpx.AsyncClient, case: dict[str, Any]) -> tuple[str, Any]:
        async with http.stream("POST", f"{server}/v1/completions",
                               json={**base, **case, "stream": True}) as response:
            events, _ = parse_sse((await response.aread()).decode())
        choices = [e["choices"][0] for e in events]
        assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["stop"]
        return "".join(c["text"] for c in choices), choices[-1]["stop_reason"]

    async def run_all() -> list[tuple[str, Any]]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(stream(http, case) for case in cases * 8))

    assert asyncio.run(run_all()) == expected * 8


def test_64_concurrent_streams_and_metrics(server: str, llm: LLM) -> None:
    rng = random.Random(4)
    prompts: list[Any] = [f"Story {i}: the {rng.choice(['red', 'blue', 'green'])} "
                          f"{rng.choice(['cat', 'ship', 'tree', 'river'])} saw" for i in range(32)]
    prompts += [[rng.randrange(100, 40_000) for _ in range(rng.randrange(5, 60))]
                for _ in range(32)]
    expected = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    before = wait_idle(server)

    async def run_all() -> list[tuple[str, dict[str, Any]]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(_stream_completion(http, server, p, 16)
                                          for p in prompts))

    results = asyncio.run(run_all())
    assert [text for text, _ in results] == [e.outputs[0].text for e in expected]
    after = wait_idle(server)
    assert finished_total(after) - finished_total(before) == 64
    prompt_tokens = sum(usage["prompt_tokens"] for _, usage in results)
    assert prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert after["kvtier:prompt_tokens_total"] - before["kvtier:prompt_tokens_total"] \
        == prompt_tokens
    assert after["kvtier:generation_tokens_total"] \
        - before["kvtier:generation_tokens_total"] == 64 * 16
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_tokenize_time_seconds"):
        count = f"kvtier:{name}_count"
        assert after[count] - before[count] == 64
    # vLLM's split of the TTFT: queued in the core and scheduled-to-first-token are parts of
    # it, both positive, and together they leave the front end's share (tokenising) >= 0.
    ttft, queue, prefill = (after[f"kvtier:{name}_sum"] - before[f"kvtier:{name}_sum"]
                            for name in ("time_to_first_token_seconds",
                                         "request_queue_time_seconds",
                                         "request_prefill_time_seconds"))
    assert queue > 0 and prefill > 0 and queue + prefill <= ttft
    # Tokenising is the first part of the front end's share.
    tokenize = (after["kvtier:request_tokenize_time_seconds_sum"]
                - before["kvtier:request_tokenize_time_seconds_sum"])
    assert 0 < tokenize <= ttft - queue - prefill
    itl = "kvtier:inter_token_latency_seconds_count"
    assert after[itl] - before[itl] == 64 * 15
    # A step gives a request at most one token, and with prompts this short every step
    # samples: the engine's step counter lies between the two.
    steps = after["kvtier:engine_steps_total"] - before["kvtier:engine_steps_total"]
    assert 16 <= steps <= 64 * 16
    # The prompts' steps came first and the last tokens were decodes only; every step that
    # ran something is one of the two kinds, and each kind's time was counted.
    def grew(name: str) -> float:
        return after[f"kvtier:{name}_total"] - before[f"kvtier:{name}_total"]
    assert grew("engine_prompt_steps") >= 1 and grew("engine_decode_only_steps") >= 1
    assert grew("engine_prompt_steps") + grew("engine_decode_only_steps") <= steps
    assert grew("engine_prompt_step_seconds") > 0 and grew("engine_decode_only_step_seconds") > 0


# -- 3. clients that leave mid-stream free their KV blocks -----------------------------------


def test_disconnects_free_kv_blocks(server: str) -> None:
    long = {"model": MODEL, "max_tokens": 200, "ignore_eos": True, "stream": True, **GREEDY}
    # How long the non-streaming request below takes to finish on this machine (a 2-layer
    # model can generate its 200 tokens in well under a second): its client then gives up
    # after a quarter of that, while the request is surely still generating.
    started = time.perf_counter()
    full = httpx.post(f"{server}/v1/completions", json={**long, "stream": False, "prompt": "x"},
                      timeout=60)
    assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] == 200
    give_up_s = (time.perf_counter() - started) / 4
    before = wait_idle(server)

    async def leave_early(http: httpx.AsyncClient, i: int) -> None:
        body = {**long, "prompt": f"request {i} " * 8}
        async with http.stream("POST", f"{server}/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            for _ in range(3):  # a few tokens, then the client goes away
                await anext(lines)

    async def leave_all() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*(leave_early(http, i) for i in range(8)))
            # A request of three choices whose client leaves: all three end.
            body = {**long, "prompt": "three choices", "n": 3}
            async with http.stream("POST", f"{server}/v1/completions", json=body) as response:
                lines = response.aiter_lines()
                for _ in range(3):
                    await anext(lines)

    asyncio.run(leave_all())
    # A non-streaming client that gives up waiting is aborted too, every choice of it.
    for n in (1, 3):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}/v1/completions",
                       json={**long, "stream": False, "prompt": "x", "n": n},
                       timeout=give_up_s)
    after = wait_idle(server)
    aborted = 'kvtier:request_success_total{finished_reason=abort}'
    assert after[aborted] - before[aborted] == 8 + 3 + 1 + 3
    assert after["kvtier:generation_tokens_total"] - before["kvtier:generation_tokens_total"] \
        < 15 * 100
    response = httpx.post(f"{server}/v1/completions", json={"prompt": "still here?",
                                                            "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


# -- 4. bad input: 4xx with OpenAI's error body, never a 5xx ---------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS: list[tuple[str, Any, int]] = [
    (COMPLETIONS, b"{not json", 400),
    (COMPLETIONS, b"[1, 2]", 400),
    (COMPLETIONS, b"", 400),
    (COMPLETIONS, {}, 400),
    (COMPLETIONS, {"prompt": 12}, 400),
    (COMPLETIONS, {"prompt": ""}, 400),
    # A lone surrogate (valid JSON, not valid Unicode), sent as the escape a client sends.
    (COMPLETIONS, b'{"prompt": "a\\ud800b"}', 400),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    # The engine tokenises bad_words: one it cannot is the request's fault, not a 500.
    (COMPLETIONS, b'{"prompt": "hi", "bad_words": ["\\ud800"]}', 400),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "bad_words": ["a\\udc80"]}',
     400),
    (COMPLETIONS, {"prompt": []}, 400),
    # A batch runs whole or not at all: one bad prompt refuses it (nothing is added).
    (COMPLETIONS, {"prompt": ["a", ""]}, 400),
    (COMPLETIONS, {"prompt": ["a", "word " * 400]}, 400),
    (COMPLETIONS, {"prompt": [[1, 2], [10**9]]}, 400),
    (COMPLETIONS, {"prompt": [[1, 2], []]}, 400),
    (COMPLETIONS, {"prompt": ["a", [1, 2]]}, 400),
    (COMPLETIONS, {"prompt": [1, -5]}, 400),
    (COMPLETIONS, {"prompt": [10**9]}, 400),
    (COMPLETIONS, {"prompt": [1, True]}, 400),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-4"}, 404),
    (COMPLETIONS, {"prompt": "word " * 400}, 400),
    (COMPLETIONS, {"prompt": list(range(5, 300))}, 400),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -3}, 400),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**6}, 400),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "many"}, 400),
    # JSON's own types only: no bool for a count, no string for a number or a flag.
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "3"}, 400),
    (COMPLETIONS, {"prompt": "hi", "top_k": True}, 400),
    (COMPLETIONS, {"prompt": "hi", "n": True}, 400),
    (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400),
    (CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, 400),
    (COMPLETIONS, {"prompt": "hi", "temperature": -1}, 400),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400),
    (COMPLETIONS, {"prompt": "hi", "top_p": 1.5}, 400),
    (COMPLETIONS, {"prompt": "hi", "top_k": -2}, 400),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**70}, 400),
    (COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400),
    (COMPLETIONS, {"prompt": "hi", "stop": [1]}, 400),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, 400),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, 400),
    (COMPLETIONS, {"prompt": "hi", "n": 2, "best_of": 4}, 400),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 2.5}, 400),
    (COMPLETIONS, {"prompt": "hi", "repetition_penalty": -1}, 400),
    (COMPLETIONS, {"prompt": "hi", "min_p": 2}, 400),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, 400),
    (COMPLETIONS, {"prompt": "hi", "response_format": {"type": "json_schema"}}, 400),
    (COMPLETIONS, {"prompt": "hi", "guided_regex": "a+"}, 400),
    (COMPLETIONS, {"prompt": "hi", "echo": "yes"}, 400),
    (COMPLETIONS, {"prompt": "hi", "prompt_logprobs": 21}, 400),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400),  # 0 only with echo
    (CHAT, {"messages": USER, "prompt_logprobs": 1}, 400),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400),  # over --max-logprobs (20)
    (COMPLETIONS, {"prompt": "hi", "logprobs": -1}, 400),
    (COMPLETIONS, {"prompt": "hi", "stream": "yes please"}, 400),
    (COMPLETIONS, {"prompt": "hi", "stream_options": 3}, 400),
    (COMPLETIONS, {"prompt": "x" * 70_000}, 413),
    (CHAT, {"messages": []}, 400),
    (CHAT, {"messages": "hi"}, 400),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    (CHAT, {"messages": [{"content": "hi"}]}, 400),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, 400),
    (CHAT, {"messages": USER, "max_tokens": 10_000}, 400),
    (CHAT, {"messages": USER, "model": "nope"}, 404),
    (CHAT, {"messages": USER, "n": 500}, 400),
    (CHAT, {"messages": USER, "top_logprobs": 3}, 400),  # without logprobs: true
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400),
    (CHAT, {"messages": USER, "temperature": "hot"}, 400),
    (CHAT, {"messages": [{"role": "user", "content": "long " * 300}]}, 400),
    ("/v1/embeddings", {"input": "hi"}, 404),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400),
    (CHAT, {"messages": USER, "chat_template": "{{ messages }}"}, 400),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"messages": 1}}, 400),
    (CHAT, {"messages": USER, "chat_template_kwargs": [1]}, 400),
    ("/tokenize", {}, 400),
    ("/tokenize", {"messages": USER, "chat_template": "{{ messages }}"}, 400),
    ("/tokenize", {"messages": USER, "chat_template_kwargs": {"add_generation_prompt": 1}},
     400),
    ("/tokenize", {"prompt": "hi", "messages": USER}, 400),
    ("/tokenize", {"prompt": ["hi"]}, 400),
    ("/tokenize", {"prompt": "hi", "model": "nope"}, 404),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/detokenize", {}, 400),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_REQUESTS,
                         ids=[f"{i}-{p.removeprefix('/v1/').replace('/', '-')}" for i, (p, _, _) in
                              enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors(server: str, path: str, body: Any, status: int) -> None:
    if isinstance(body, bytes):
        response = httpx.post(f"{server}{path}", content=body,
                              headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{server}{path}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_openai_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore


_FIELDS = ["model", "prompt", "messages", "tokens", "add_special_tokens", "tools",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
           "chat_template_kwargs", "tool_choice", "max_tokens",
           "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
           "stop_token_ids", "ignore_eos", "stream",
           "stream_options", "n", "echo", "logprobs", "top_logprobs", "prompt_logprobs",
           "return_tokens_as_token_ids", "include_stop_str_in_output", "user"]
_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 40)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
            | st.sampled_from([MODEL, "", "user", "assistant", "\ud800"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(["role", "content", "type", "text",
                                                          "include_usage"]) | st.text(max_size=5),
                                         inner, max_size=4), max_leaves=12)
_MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
     "content": st.text(max_size=40) | _VALUES}), min_size=0, max_size=3)
_BODIES = st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), _VALUES, max_size=8)


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from([COMPLETIONS, CHAT, "/tokenize", "/detokenize"]), body=_BODIES,
       prompt=st.text(max_size=60) | st.lists(st.integers(-5, 50_000), max_size=20),
       messages=_MESSAGES, with_core=st.booleans())
def test_fuzzed_bodies_never_5xx(server: str, path: str, body: dict[str, Any], prompt: Any,
                                 messages: list[Any], with_core: bool) -> None:
    if with_core:  # well-formed cores, so the fuzz reaches the engine too; kept short
        core = {COMPLETIONS: ("prompt", prompt), CHAT: ("messages", messages),
                "/tokenize": ("messages", messages) if isinstance(prompt, list)
                else ("prompt", prompt), "/detokenize": ("tokens", prompt)}
        key, value = core[path]
        body = {key: value, "max_tokens": 4, **body}
    payload = json.dumps(body).encode()
    with httpx.stream("POST", f"{server}{path}", content=payload, timeout=60,
                      headers={"content-type": "application/json"}) as response:
        assert response.status_code < 500, response.read()
        if response.status_code >= 400:
            assert "error" in json.loads(response.read())



def test_chat_template_and_generation_config_flags_reach_every_front_end(tmp_path: Path,
                                                                        llm: LLM) -> None:
    """`--chat-template` renders the messages instead of the model's template, and
    `--generation-config` (here a folder: greedy, 4 tokens) fills the sampling a request
    leaves out, on each of two API servers: the answers are the offline engine's with the
    same template and sampling."""
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "chat.jinja").write_text(template)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.0, "max_new_tokens": 4}))
    messages = [{"role": "user", "content": "Name a colour."}]
    expected = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0.0),
                        chat_template=template)[0]
    assert expected.prompt_token_ids == llm.get_tokenizer().encode(
        "[user] Name a colour.\n[assistant] ", add_special_tokens=False)
    proc = ServerProcess("--chat-template", str(tmp_path / "chat.jinja"),
                         "--generation-config", str(tmp_path), "--api-server-count", "2")
    try:
        for _ in range(4):  # new connections: the kernel spreads them over both servers
            response = httpx.post(f"{proc.url}/v1/chat/completions",
                                  json={"model": MODEL, "messages": messages}, timeout=60)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)
            assert body["choices"][0]["message"]["content"] == expected.outputs[0].text
            assert body["usage"]["completion_tokens"] == len(expected.outputs[0].token_ids)
        assert any("default sampling of requests that set none: temperature 0.0, "
                   "max_tokens 4" in line for line in proc.lines)
    finally:
        assert proc.stop() == 0, "".join(proc.lines[-30:])


# -- 5. queue overflow -> 503 + Retry-After, then recovery; SIGTERM drains ---------------------


@pytest.fixture(scope="module")
def guarded() -> Iterator[str]:
    """One running request at a time, two may wait, and an API key."""
    proc = ServerProcess("--max-num-seqs", "1", "--max-waiting-requests", "2",
                         "--api-key", "sesame")
    yield proc.url
    assert proc.stop() == 0, "".join(proc.lines[-30:])


AUTH = {"Authorization": "Bearer sesame"}


def test_queue_overflow_503_then_recovers(guarded: str) -> None:
    long = {"max_tokens": 200, "ignore_eos": True, "stream": True, **GREEDY}

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as http:
            runner = http.stream("POST", f"{guarded}/v1/completions",
                                 json={**long, "prompt": "the runner"})
            running = await runner.__aenter__()
            lines = running.aiter_lines()  # keep it: a collected iterator closes the stream
            await anext(lines)  # first token: the runner holds the only seat
            waiters = [http.stream("POST", f"{guarded}/v1/completions",
                                   json={**long, "max_tokens": 2, "prompt": f"waiter {i}"})
                       for i in range(2)]
            waiting = [await w.__aenter__() for w in waiters]  # 200: accepted, now waiting
            assert [r.status_code for r in waiting] == [200, 200]
            rejected = await http.post(f"{guarded}/v1/completions",
                                       json={"prompt": "one too many", "max_tokens": 2})
            assert rejected.status_code == 503, rejected.text
            assert int(rejected.headers["retry-after"]) >= 1
            assert rejected.json()["error"]["code"] == "queue_full"
            await runner.__aexit__(None, None, None)  # the runner leaves: the waiters run
            for waiter, response in zip(waiters, waiting, strict=True):
                events, _ = parse_sse((await response.aread()).decode())
                assert events[-1]["choices"][0]["finish_reason"] == "length"
                await waiter.__aexit__(None, None, None)
            recovered = await http.post(f"{guarded}/v1/completions",
                                        json={"prompt": "room again", "max_tokens": 2})
            assert recovered.status_code == 200, recovered.text

    asyncio.run(scenario())


# -- 6. the API key: 401 without it, and the engine never sees the request --------------------


def test_api_key_required_on_v1(guarded: str) -> None:
    before = wait_idle(guarded)
    body = {"prompt": "let me in", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"},
                    {"Authorization": "Bearer sesame2"}):
        for path in (COMPLETIONS, CHAT, "/v1/models"):
            response = httpx.post(f"{guarded}{path}", json=body, headers=headers) \
                if path != "/v1/models" else httpx.get(f"{guarded}{path}", headers=headers)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
    bad_json = httpx.post(f"{guarded}{COMPLETIONS}", content=b"{", headers={"x": "y"})
    assert bad_json.status_code == 401  # refused before the body is even parsed
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    after = metrics(guarded)
    for name in ("kvtier:prompt_tokens_total", "kvtier:generation_tokens_total",
                 "kvtier:prefix_cache_queries_total", "kvtier:time_to_first_token_seconds_count"):
        assert after[name] == before[name], name
    assert finished_total(after) == finished_total(before)
    assert httpx.get(f"{guarded}/health").status_code == 200  # open without the key
    ok = openai.OpenAI(base_url=f"{guarded}/v1", api_key="sesame", max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage is not None
    assert finished_total(metrics(guarded)) == finished_total(before) + 1


def test_reset_prefix_cache_needs_the_key_and_makes_the_next_prompt_cold(guarded: str) -> None:
    """vLLM's POST /reset_prefix_cache, behind the API key as an admin route: 200 with what
    was forgotten, then the same prompt is computed afresh (0 cached tokens, the same text); a
    bad or unsupported parameter is a 400 naming it. (The tiny model finishes a request
    before a reset sent after its first token arrives: test_app checks the 409.)"""
    url = f"{guarded}/reset_prefix_cache"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    body = {"prompt": "a prompt that fills a few blocks of the KV cache " * 6, "max_tokens": 3,
            **GREEDY}

    def complete() -> dict[str, Any]:
        response = httpx.post(f"{guarded}{COMPLETIONS}", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    first, warm = complete(), complete()
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    reset = httpx.post(url, headers=AUTH)
    assert reset.status_code == 200, reset.text
    assert reset.json()["device_blocks"] >= 1 and reset.json()["tier_entries"] == 0
    cold = complete()
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cold["choices"][0]["text"] == warm["choices"][0]["text"] == first["choices"][0]["text"]
    for params, param in (({"reset_external": "maybe"}, "reset_external"),
                          ({"reset_running_requests": "true"}, "reset_running_requests")):
        refused = httpx.post(url, params=params, headers=AUTH)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param, refused.text
    wait_idle(guarded)
    assert httpx.post(url, params={"reset_external": "true"}, headers=AUTH).status_code == 200


def test_sigterm_drains_then_aborts_and_exits_zero() -> None:
    # A 2 s grace period: the 40-token requests finish well within it, and the 1,900-token
    # ones cannot (on this repo's 2-core box they take ~4.5 s; with a 5 s grace period they
    # sometimes finished, and the test failed one run in two).
    proc = ServerProcess("--shutdown-timeout", "2", "--max-model-len", "2048",
                         env={"KVTIER_API_KEY": "k"})
    url, headers = proc.url, {"Authorization": "Bearer k"}
    assert httpx.get(f"{url}/v1/models").status_code == 401  # the env var set the key

    async def scenario() -> tuple[list[str], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=60, headers=headers) as http:
            def stream(max_tokens: int) -> Any:
                body = {"prompt": f"drain {max_tokens}", "max_tokens": max_tokens,
                        "ignore_eos": True, "stream": True, **GREEDY}
                return http.post(f"{url}/v1/completions", json=body)

            def plain(max_tokens: int) -> Any:
                return http.post(f"{url}/v1/completions", json={
                    "prompt": "plain", "max_tokens": max_tokens, "ignore_eos": True})

            # Short ones finish within the grace period; long ones (far longer) are aborted.
            tasks = [asyncio.ensure_future(c) for c in (stream(40), stream(1900), plain(40),
                                                         plain(1900))]
            await asyncio.sleep(0.5)  # all four are in flight
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no longer listening
                httpx.get(f"{url}/health")
            responses = await asyncio.gather(*tasks)
            return [r.text for r in responses[:2]], list(responses[2:])

    (short_stream, long_stream), (short_plain, long_plain) = asyncio.run(scenario())
    events, _ = parse_sse(short_stream)
    assert "choices" in events[-1], short_stream[-600:]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    events, _ = parse_sse(long_stream)  # aborted at the grace period, but ends with [DONE]
    assert events[-1]["error"]["code"] == "request_shutdown"
    assert short_plain.status_code == 200
    assert long_plain.status_code == 503
    assert proc.proc.wait(30) == 0, "".join(proc.lines[-30:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_front_end_never_loads_torch(server_process: ServerProcess) -> None:
    """The front end resolves the model for its tokenizer only; torch and the model's code
    load in the engine process. Before, importing them took ~4 s of each front end's ~11.7 s
    start on a 2-core box (a second front end's too) and ~190 MB of its memory. Last in this
    file: by then the module's server has served every kind of request the tests send."""
    [engine] = spawned_children(server_process.proc.pid)
    assert "libtorch" in Path(f"/proc/{engine}/maps").read_text()  # seen where it is loaded
    assert "libtorch" not in Path(f"/proc/{server_process.proc.pid}/maps").read_text()
