"""The SSE streams built from outputs that `OutputSink` merged as they arrived (a lagging
stream) carry exactly what one chunk per step carries: every token's text, logprob entry
and text offset once and in order, usage counts that match the tokens sent, the prompt's
echo and logprobs once, the final text of a stop string, and an error behind held outputs
after them; a client that leaves while its stream holds outputs still has its request
aborted. Each request's outputs are fed to its sink in groups (one per step, all at once,
random splits), as the dispatcher would hand them to a stream that fell that far behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from kvtier.engine.async_engine import RequestStream
from kvtier.engine.async_types import OutputSink, RequestAbortedError
from kvtier.engine.core_messages import StreamState
from kvtier.server.logprobs import LogprobsFormat, TokenStrings
from kvtier.server.responses import (
    ResponseContext,
    SSEResponse,
    chat_events,
    completion_events,
)
from kvtier.types import OutputDelta, RequestMetrics, RequestOutput, SamplingParams, TokenLogprobs
from tests.unit.server.fakes import FakeEngine, FakeTokenizer, start_async_engine

pytestmark = pytest.mark.timeout(30)

WORDS = {10: "He", 11: "llo", 12: ",", 13: " wor", 14: "ld", 15: "!", 16: " ST", 17: "OP",
         18: " tail", 19: "é", 20: "ok"}
"""Tokens of several characters, so text offsets differ from token indices."""
PROMPT = [20, 12, 20]  # "ok,ok"
TOKENS = [10, 11, 12, 13, 14, 15, 16, 17, 18]  # "Hello, world! STOP tail"


class WordTokenizer(FakeTokenizer):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(WORDS.get(i, chr(i)) for i in ids)


STRINGS = TokenStrings(WordTokenizer())  # type: ignore[arg-type]


def entry(token: int, position: int) -> TokenLogprobs:
    """A distinct logprob per position; the top two hold the token and one other."""
    logprob = -0.25 * (position + 1)
    return TokenLogprobs(token, logprob, 1, ((token, logprob), (99, logprob - 1.0)))


def deltas(request_id: str, tokens: list[int], *, stop: str | None = None,
           logprobs: bool = True, prompt_logprobs: bool = False) -> list[OutputDelta]:
    """A request's deltas, one token per step, as the engine's output processor makes them:
    with an (excluded) stop string, text that may start it is held back and the final text
    cuts it off."""
    metrics = RequestMetrics(arrival_time=0.0, num_prompt_tokens=len(PROMPT))
    hold = len(stop) - 1 if stop else 0
    text, num_sent, result = "", 0, []
    for step, token in enumerate(tokens):
        text += WORDS[token]
        finished, reason, stop_reason = step == len(tokens) - 1, "length", None
        if stop and stop in text:
            text, finished, reason, stop_reason = text[:text.index(stop)], True, "stop", stop
        visible = len(text) if finished else max(num_sent, len(text) - hold)
        new_text, num_sent = text[num_sent:visible], visible
        result.append(OutputDelta(
            request_id, [token], new_text, finished, reason if finished else None, stop_reason,
            metrics if step == 0 or finished else None,
            final_text=text if finished else None,
            prompt=None if step else "ok,ok", prompt_token_ids=None if step else list(PROMPT),
            new_logprobs=[entry(token, step)] if logprobs else None,
            prompt_logprobs=([None, entry(12, 1), entry(20, 2)]
                             if prompt_logprobs and step == 0 else None)))
        if finished:
            break
    return result


def groupings(num: int) -> dict[str, list[int]]:
    """Group sizes covering `num` steps: one per step, all at once, random splits."""
    result = {"each": [1] * num, "all": [num]}
    for seed in range(4):
        rng, sizes, left = random.Random(seed), [], num
        while left:
            sizes.append(rng.randint(1, left))
            left -= sizes[-1]
        result[f"random{seed}"] = sizes
    return result


class Aborts:
    """The engine, as a stream's `close` sees it."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


async def feed(sink: OutputSink, items: list[OutputDelta | BaseException],
               sizes: list[int]) -> None:
    """Put `items` in groups of `sizes`, each group while the stream reads nothing, and wait
    for the stream to take each group before the next (outputs built as they are put, as
    the dispatcher does: streaming outputs share the request's live token list)."""
    state = StreamState()
    start = 0
    for size in sizes:
        for item in items[start:start + size]:
            sink.put(item if isinstance(item, BaseException) else state.apply(item))
        start += size
        for _ in range(10_000):
            if not sink._items:
                break
            await asyncio.sleep(0)


def run_stream(kind: str, ctx: ResponseContext,
               requests: list[tuple[list[OutputDelta | BaseException], list[int]]],
               ) -> tuple[list[dict[str, Any]], Aborts]:
    """The SSE events of `completion_events` or `chat_events` over one stream per request,
    each fed in its groups; and what the streams aborted."""
    engine = Aborts()

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        sinks = [OutputSink(loop) for _ in requests]
        streams = [RequestStream(engine, f"r{i}", sink)  # type: ignore[arg-type]
                   for i, sink in enumerate(sinks)]
        events = completion_events if kind == "completions" else chat_events

        async def consume() -> list[str]:
            return [event async for event in events(streams, ctx)]

        taken, *_ = await asyncio.gather(consume(), *(
            feed(sink, items, sizes) for sink, (items, sizes) in zip(sinks, requests,
                                                                     strict=True)))
        return taken

    body = asyncio.run(scenario())
    assert body[-1] == "data: [DONE]\n\n"
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in body)
    return [json.loads(e.removeprefix("data: ")) for e in body[:-1]], engine


def context(*, logprobs: int | None = 2, echo: str | None = None, prompt_logprobs: bool = False,
            usage: bool = False, n: int = 1) -> ResponseContext:
    return ResponseContext(
        "cmpl-x", "m", 0, include_usage=usage,
        logprobs=None if logprobs is None else LogprobsFormat(STRINGS, logprobs),
        echo=None if echo is None else (echo,) * n,
        prompt_logprobs=STRINGS if prompt_logprobs else None, choices_per_prompt=n,
        continuous_usage=usage)


def names(tokens: list[int]) -> list[str]:
    return [WORDS[t] for t in tokens]


def offsets(tokens: list[int]) -> list[int]:
    return [sum(len(WORDS[t]) for t in tokens[:i]) for i in range(len(tokens))]


def choice_chunks(events: list[dict[str, Any]], index: int = 0) -> list[dict[str, Any]]:
    return [e for e in events if e["choices"] and e["choices"][0]["index"] == index]


def test_completion_logprobs_and_offsets_are_whole_and_ordered_however_merged() -> None:
    items = deltas("r0", TOKENS)
    expected_tokens = names(TOKENS)
    seen = {}
    for label, sizes in groupings(len(items)).items():
        events, _ = run_stream("completions", context(), [(list(items), sizes)])
        chunks = [c["choices"][0] for c in choice_chunks(events)]
        assert len(chunks) == len(sizes), label  # a chunk per group: they were merged
        lp = [c["logprobs"] for c in chunks]
        tokens = [t for x in lp for t in x["tokens"]]
        assert tokens == expected_tokens, label
        assert [o for x in lp for o in x["text_offset"]] == offsets(TOKENS), label
        assert [v for x in lp for v in x["token_logprobs"]] == \
            [-0.25 * (i + 1) for i in range(len(TOKENS))], label
        tops = [t for x in lp for t in x["top_logprobs"]]
        assert all(top[name] == -0.25 * (i + 1) and len(top) == 2
                   for i, (name, top) in enumerate(zip(tokens, tops, strict=True))), label
        assert "".join(c["text"] for c in chunks) == "Hello, world! STOP tail", label
        assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
        seen[label] = (tokens, [o for x in lp for o in x["text_offset"]])
    assert len(set(map(repr, seen.values()))) == 1


def test_echo_prompt_logprobs_and_usage_survive_merging() -> None:
    items = deltas("r0", TOKENS, prompt_logprobs=True)
    prompt_names = names(PROMPT)
    for label, sizes in groupings(len(items)).items():
        ctx = context(echo="ok,ok", prompt_logprobs=True, usage=True)
        events, _ = run_stream("completions", ctx, [(list(items), sizes)])
        chunks = choice_chunks(events)
        choices = [c["choices"][0] for c in chunks]
        assert len(choices) == len(sizes), label
        # The echo leads the first chunk only; vLLM's prompt_logprobs field comes once.
        assert "".join(c["text"] for c in choices) == "ok,ok" + "Hello, world! STOP tail"
        assert choices[0]["text"].startswith("ok,ok")
        assert [c["prompt_logprobs"] is not None for c in choices] == \
            [True] + [False] * (len(choices) - 1), label
        assert len(choices[0]["prompt_logprobs"]) == len(PROMPT)
        # The echoed prompt's tokens lead the logprobs (the first with null), then every
        # output token once; offsets run on across the prompt's text.
        lp = [c["logprobs"] for c in choices]
        assert [t for x in lp for t in x["tokens"]] == prompt_names + names(TOKENS), label
        assert [o for x in lp for o in x["text_offset"]] == offsets(PROMPT + TOKENS), label
        assert [v for x in lp for v in x["token_logprobs"]][:len(PROMPT)] == [None, -0.5, -0.75]
        # Continuous usage: each chunk counts the output tokens sent up to it, whatever
        # number of steps it merged; the final usage counts them all.
        sent = 0
        for chunk, x in zip(chunks, lp, strict=True):
            sent += len(x["tokens"]) - (len(PROMPT) if chunk is chunks[0] else 0)
            assert chunk["usage"]["completion_tokens"] == sent, label
            assert chunk["usage"]["prompt_tokens"] == len(PROMPT)
            assert chunk["usage"]["total_tokens"] == len(PROMPT) + sent
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == \
            len(TOKENS) and events[-1]["usage"]["prompt_tokens"] == len(PROMPT)


def test_chat_logprobs_and_usage_are_whole_and_ordered_however_merged() -> None:
    items = deltas("r0", TOKENS)
    for label, sizes in groupings(len(items)).items():
        events, _ = run_stream("chat", context(usage=True), [(list(items), sizes)])
        chunks = choice_chunks(events)
        choices = [c["choices"][0] for c in chunks]
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[0]["usage"]["completion_tokens"] == 0
        rest = choices[1:]
        assert len(rest) == len(sizes), label
        assert "".join(c["delta"]["content"] or "" for c in rest) == "Hello, world! STOP tail"
        content = [e for c in rest for e in c["logprobs"]["content"]]
        assert [e["token"] for e in content] == names(TOKENS), label
        assert [e["logprob"] for e in content] == [-0.25 * (i + 1) for i in range(len(TOKENS))]
        assert all([t["token"] for t in e["top_logprobs"]] == [e["token"], "c"]
                   for e in content), label  # token 99 is "c"
        sent = 0
        for chunk, choice in zip(chunks[1:], rest, strict=True):
            sent += len(choice["logprobs"]["content"])
            assert chunk["usage"]["completion_tokens"] == sent, label
        assert [c["finish_reason"] for c in rest] == [None] * (len(rest) - 1) + ["length"]
        assert events[-1]["usage"]["completion_tokens"] == len(TOKENS)


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("logprobs", [None, 1])
def test_a_stop_strings_final_text_is_what_the_stream_sent_however_merged(
        kind: str, logprobs: int | None) -> None:
    items = deltas("r0", TOKENS, stop=" STOP", logprobs=logprobs is not None)
    final = items[-1]
    assert final.finished and final.final_text == "Hello, world!"  # the stop cut its text
    assert "".join(d.new_text for d in items) == final.final_text
    for label, sizes in groupings(len(items)).items():
        events, _ = run_stream(kind, context(logprobs=logprobs), [(list(items), sizes)])
        choices = [c["choices"][0] for c in choice_chunks(events)]
        texts = [c["text"] if kind == "completions" else c["delta"]["content"] or ""
                 for c in choices]
        assert "".join(texts) == "Hello, world!", label  # the non-streamed text
        assert choices[-1]["finish_reason"] == "stop" and choices[-1]["stop_reason"] == " STOP"
        if logprobs is not None:  # every generated token's entry, the stop's own included
            key = "tokens" if kind == "completions" else "content"
            entries = [e for c in choices if c["logprobs"] for e in c["logprobs"][key]]
            assert [e if kind == "completions" else e["token"] for e in entries] == \
                names(TOKENS[:len(items)]), label


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_n_choices_merge_each_in_its_own_stream(kind: str) -> None:
    first, second = deltas("r0", TOKENS), deltas("r1", [20, 19, 20, 19, 15])
    events, _ = run_stream(kind, context(n=2, usage=True), [
        (list(first), [len(first)]), (list(second), [1] * len(second))])
    for index, (items, text) in enumerate([(first, "Hello, world! STOP tail"),
                                           (second, "okéoké!")]):
        chunks = [c["choices"][0] for c in choice_chunks(events, index)]
        if kind == "chat":
            chunks = chunks[1:]  # the role
        assert len(chunks) == (1 if index == 0 else len(items))
        texts = [c["text"] if kind == "completions" else c["delta"]["content"] or ""
                 for c in chunks]
        assert "".join(texts) == text
        key = "tokens" if kind == "completions" else "content"
        tokens = [e if kind == "completions" else e["token"]
                  for c in chunks for e in c["logprobs"][key]]
        assert tokens == names([d.new_token_ids[0] for d in items])
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == len(first) + len(second)
    assert usage["prompt_tokens"] == len(PROMPT)  # one prompt, two choices


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize(("reason", "code"), [("timeout", "request_timeout"),
                                              ("error", "request_error"),
                                              ("shutdown", "request_shutdown")])
def test_an_abort_behind_held_outputs_follows_them(kind: str, reason: str, code: str) -> None:
    items: list[OutputDelta | BaseException] = list(deltas("r0", TOKENS)[:4])
    error = RequestAbortedError(reason, None, "aborted")  # type: ignore[arg-type]
    for sizes in ([5], [1, 4], [1, 1, 1, 1, 1]):
        events, engine = run_stream(kind, context(), [([*items, error], sizes)])
        assert events[-1]["error"]["code"] == code
        chunks = [c["choices"][0] for c in events[:-1]]
        if kind == "chat":
            assert chunks[0]["delta"]["role"] == "assistant"
            chunks = chunks[1:]
        texts = [c["text"] if kind == "completions" else c["delta"]["content"] for c in chunks]
        assert "".join(texts) == "Hello, wor"  # every output before the error, then it
        assert all(c["finish_reason"] is None for c in chunks)
        assert engine.aborted == []  # ended by the engine: nothing left to abort


@pytest.mark.parametrize("spec", ["2.0", "2.4"], ids=["disconnect-message", "send-fails"])
def test_a_client_gone_while_its_stream_holds_outputs_aborts_the_request(spec: str) -> None:
    """The client stops reading (its socket's buffer is full: the SSE send blocks), the
    engine's outputs pile up in the sink, merged, and then the client goes: the response
    closes the stream, which aborts the request, so the engine frees it."""
    fake = FakeEngine(step_delay_s=0.01)
    engine = start_async_engine(fake)

    async def scenario() -> int:
        stream = await engine.add_request(
            "left", SamplingParams(max_tokens=10_000, temperature=0.0), "gone")
        response = SSEResponse(completion_events([stream], context(logprobs=None)),
                               media_type="text/event-stream")
        stuck, gone = asyncio.Event(), asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                stuck.set()
                await gone.wait()
                if spec == "2.4":  # ASGI 2.4: a send to a closed connection fails
                    raise OSError("the client is gone")
                await asyncio.Event().wait()  # 2.0: it never returns; receive says gone

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(response({"type": "http", "asgi": {"spec_version": spec}},
                                              receive, send))
        await stuck.wait()
        await asyncio.sleep(0.1)  # steps arrive while nothing reads: held, merged
        (held,) = stream._sink._items
        assert isinstance(held, RequestOutput) and not held.finished
        gone.set()
        with contextlib.suppress(ClientDisconnect):
            await task
        for _ in range(500):
            if not fake.requests and engine.snapshot().num_live_requests == 0:
                break
            await asyncio.sleep(0.01)
        return len(held.new_token_ids)

    try:
        assert asyncio.run(scenario()) > 1
        assert fake.aborted == ["gone"] and not fake.requests
        assert engine.snapshot().num_live_requests == 0
    finally:
        asyncio.run(engine.shutdown(drain=False))
