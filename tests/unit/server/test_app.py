"""The app in-process over a fake engine: wire format, errors, timeouts, guards, metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from kvtier.engine.async_engine import AsyncEngine
from kvtier.model.generation_config import SamplingDefaults
from kvtier.server.app import ServerSettings, create_app
from kvtier.tiers.base import TierStats
from kvtier.tiers.manager import ManagerStats
from kvtier.types import InvalidRequestError, PrefixCacheReset, SamplingParams
from tests.unit.server.fakes import FakeEngine, start_async_engine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def engine() -> Iterator[AsyncEngine]:
    engine = start_async_engine(FakeEngine())
    yield engine
    asyncio.run(engine.shutdown(drain=False))


def call(target: AsyncEngine | FastAPI, method: str, path: str,
         settings: ServerSettings | None = None, **kwargs: Any) -> httpx.Response:
    """One request to `target` (an app, or a fresh app around an engine)."""
    app = target if isinstance(target, FastAPI) else create_app(target, settings)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.request(method, path, **kwargs)
            await response.aread()
            return response

    return asyncio.run(go())


def sse_events(body: str) -> list[Any]:
    assert body.endswith("data: [DONE]\n\n")
    blocks = body.split("\n\n")[:-2]
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b.removeprefix("data: ")) for b in blocks]


def test_completion_and_usage(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/completions",
                    json={"prompt": "abc", "max_tokens": 3, "model": "fake-model"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-model"
    assert body["choices"][0] == {"index": 0, "text": "t0 t1 t2 ", "logprobs": None,
                                  "finish_reason": "length", "stop_reason": None,
                                  "prompt_logprobs": None}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "abc", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 1}),
    ("/tokenize", {"prompt": "abc"}), ("/detokenize", {"tokens": [97]})])
def test_an_empty_model_name_means_the_served_model(engine: AsyncEngine, path: str,
                                                    body: dict[str, Any]) -> None:
    # As vLLM's _is_model_supported: no name or "" is the default model (clients that send
    # an unset model field as ""); any other unknown name is a 404.
    response = call(engine, "POST", path, json={**body, "model": ""})
    assert response.status_code == 200, response.text
    if path.startswith("/v1/"):
        assert response.json()["model"] == "fake-model"
    unknown = call(engine, "POST", path, json={**body, "model": "other"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


def test_completion_stream_format(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/completions", json={
        "prompt": [5, 6], "max_tokens": 2, "stream": True,
        "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    # One chunk per step, or fewer where the stream fell behind and steps were merged.
    choices = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in choices) == "t0 t1 "
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 4
    no_usage = call(engine, "POST", "/v1/completions",
                    json={"prompt": "x", "max_tokens": 1, "stream": True})
    assert all("usage" not in e for e in sse_events(no_usage.text))


def test_chat_stream_role_first_then_deltas_then_finish(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/chat/completions", headers={"x-request-id": "r1"},
                    json={"messages": [{"role": "user", "content": [
                        {"type": "text", "text": "hi"}]}], "max_completion_tokens": 2,
                          "stream": True, "stream_options": {"include_usage": True}})
    assert response.headers["x-request-id"] == "r1"
    events = sse_events(response.text)
    assert all(e["id"] == "chatcmpl-r1" for e in events)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    # The role first, then one chunk per step, or fewer where the stream fell behind.
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(d.keys() == {"content"} for d in deltas[1:])
    assert "".join(d["content"] for d in deltas[1:]) == "t0 t1 "
    assert [e["choices"][0]["finish_reason"] for e in events[1:-1]] == \
        [None] * (len(events) - 3) + ["length"]
    assert events[-1]["usage"]["prompt_tokens"] == len("<user>hi<assistant>")


def test_chat_text_parts_are_joined_by_newlines_as_in_vllm(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": [
                        {"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
                          "max_completion_tokens": 1})
    assert response.json()["usage"]["prompt_tokens"] == len("<user>hi\nthere<assistant>")


def test_chat_without_max_tokens_fills_the_context(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}]})
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 64  # the fake's context


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
    ({"prompt": "x", "echo": 1}, "echo"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "prompt_logprobs": 99}, "prompt_logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"), ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"), ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "x", "guided_choice": ["a", "b"]}, "guided_choice"),
    ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ({"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"prompt": "x", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"prompt": "x", "truncate_prompt_tokens": 65}, "truncate_prompt_tokens"),  # > context
    ({"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    ({"prompt": "x", "logit_bias": {"five": 1.0}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"-5": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 1, "05": 2}}, "logit_bias"),
    ({"prompt": "x", "max_tokens": 64}, "max_tokens"), ({"prompt": "x" * 64}, "prompt"),
    ({"prompt": "x", "seed": 2**64}, "seed"), ({"prompt": "x", "top_p": 0}, "top_p"),
])
def test_bad_completion_params_name_the_param(engine: AsyncEngine, body: dict[str, Any],
                                              param: str) -> None:
    response = call(engine, "POST", "/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(("path", "body", "param"), [
    # OpenAI's types, strictly (as OpenAI checks them): a bool is no count, a string no
    # number nor flag, a float no count. Coerced, `"top_k": true` sampled greedily as top_k 1,
    # `"n": true` gave one choice, `"stream": "no"` streamed nothing but `"stream": "yes"`...
    ("/v1/completions", {"n": True}, "n"),
    ("/v1/completions", {"max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"max_tokens": "3"}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3.0}, "max_tokens"),
    ("/v1/completions", {"top_k": True}, "top_k"),
    ("/v1/completions", {"seed": True}, "seed"),
    ("/v1/completions", {"seed": "5"}, "seed"),
    ("/v1/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"temperature": True}, "temperature"),
    ("/v1/completions", {"stream": "yes"}, "stream"),
    ("/v1/completions", {"stream": 1}, "stream"),
    ("/v1/completions", {"ignore_eos": "true"}, "ignore_eos"),
    ("/v1/completions", {"stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/completions", {"logit_bias": {"5": "1"}}, "logit_bias.5"),
    ("/v1/completions", {"stop_token_ids": ["1"]}, "stop_token_ids.0"),
    ("/v1/chat/completions", {"max_completion_tokens": "5"}, "max_completion_tokens"),
    ("/v1/chat/completions", {"add_generation_prompt": "false"}, "add_generation_prompt"),
    ("/tokenize", {"add_special_tokens": "no"}, "add_special_tokens"),
])
def test_values_of_the_wrong_json_type_are_refused(engine: AsyncEngine, path: str,
                                                   body: dict[str, Any], param: str) -> None:
    core: dict[str, Any] = ({"messages": [{"role": "user", "content": "x"}]}
                            if "chat" in path else {"prompt": "x"})
    response = call(engine, "POST", path, json={**core, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_ints_are_numbers(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/completions", json={
        "prompt": "x", "max_tokens": 1, "temperature": 1, "top_p": 1, "logit_bias": {"5": 1},
        "presence_penalty": 0, "stream": False})
    assert response.status_code == 200, response.text


def test_tokenize_matches_what_completions_and_chat_run(engine: AsyncEngine) -> None:
    engine.tokenizer.adds_bos = True  # type: ignore[union-attr]
    prompt = call(engine, "POST", "/tokenize", json={"prompt": "abc", "model": "fake-model"})
    assert prompt.status_code == 200, prompt.text
    assert prompt.json() == {"count": 4, "max_model_len": 64, "tokens": [1, 97, 98, 99],
                             "token_strs": None}
    completion = call(engine, "POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 1})
    assert completion.json()["usage"]["prompt_tokens"] == prompt.json()["count"]
    bare = call(engine, "POST", "/tokenize", json={"prompt": "ab", "add_special_tokens": False,
                                                   "return_token_strs": True})
    assert bare.json()["tokens"] == [97, 98] and bare.json()["token_strs"] == ["a", "b"]
    # Messages render with the template and, by default, no added special tokens.
    messages = [{"role": "user", "content": "hi"}]
    chat = call(engine, "POST", "/tokenize", json={"messages": messages})
    assert chat.json()["tokens"] == [ord(c) for c in "<user>hi<assistant>"]
    answered = call(engine, "POST", "/v1/chat/completions",
                    json={"messages": messages, "max_completion_tokens": 1})
    assert answered.json()["usage"]["prompt_tokens"] == chat.json()["count"]
    open_turn = call(engine, "POST", "/tokenize",
                     json={"messages": messages, "add_generation_prompt": False})
    assert open_turn.json()["tokens"] == [ord(c) for c in "<user>hi"]


def test_template_extras_reach_the_template_or_are_refused(engine: AsyncEngine) -> None:
    # chat_template_kwargs render in chat and /tokenize alike; /tokenize renders tools, as
    # vLLM's does; a chat request with tools that may call them is refused (no tool-call
    # parser), never run as if they were absent; a request's own template is refused
    # everywhere.
    messages = [{"role": "user", "content": "hi"}]
    kwargs = {"enable_thinking": False}
    chat = call(engine, "POST", "/v1/chat/completions", json={
        "messages": messages, "max_completion_tokens": 1, "chat_template_kwargs": kwargs})
    tokens = call(engine, "POST", "/tokenize",
                  json={"messages": messages, "chat_template_kwargs": kwargs})
    expected = "<user>hi<enable_thinking=False><assistant>"
    assert tokens.json()["tokens"] == [ord(c) for c in expected]
    assert chat.json()["usage"]["prompt_tokens"] == len(expected)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = call(engine, "POST", "/tokenize", json={"messages": messages, "tools": tools})
    assert with_tools.json()["tokens"] == [ord(c) for c in "<tools>1<user>hi<assistant>"]
    for extra, param in (({"tools": tools}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
                         ({"chat_template": "{{ x }}"}, "chat_template"),
                         # continuing the final message needs the assistant's turn unopened
                         ({"continue_final_message": True}, "continue_final_message"),
                         ({"echo": True}, "echo")):
        refused = call(engine, "POST", "/v1/chat/completions",
                       json={"messages": messages, **extra})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    refused = call(engine, "POST", "/tokenize",
                   json={"messages": messages, "chat_template": "{{ x }}"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template"
    none = call(engine, "POST", "/v1/chat/completions",
                json={"messages": messages, "tool_choice": "none", "max_completion_tokens": 1})
    assert none.status_code == 200
    # With tool_choice "none" (vLLM's behaviour) the tools are read, not called: they render
    # into the prompt exactly as /tokenize renders them.
    read_only = call(engine, "POST", "/v1/chat/completions", json={
        "messages": messages, "tools": tools, "tool_choice": "none", "max_completion_tokens": 1})
    assert read_only.status_code == 200, read_only.text
    assert read_only.json()["usage"]["prompt_tokens"] == len("<tools>1<user>hi<assistant>")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
CALLING_REPLY = ["Let me ", "check.", "\n<tool", "_call>", '\n{"name": "get_weather", ',
                 '"arguments": {"city": ', '"Paris"}}\n', "</tool_call>", "\n<tool_call>",
                 '{"name": "get_weather", "arguments": {"city": "Oslo"}}', "</tool_call>"]


def test_auto_tool_choice_reads_the_answers_tool_calls() -> None:
    """With --enable-auto-tool-choice --tool-call-parser hermes, as vLLM: the calls come out
    as `tool_calls` (whole, one delta each when streamed), the text before them as content,
    and the finish reason is "tool_calls"; without tools the answer stays text."""
    fake = FakeEngine()
    fake.reply = CALLING_REPLY
    engine = start_async_engine(fake)
    settings = ServerSettings(tool_call_parser="hermes")
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS,
            "max_tokens": 20}
    try:
        whole = call(engine, "POST", "/v1/chat/completions", settings, json=body)
        assert whole.status_code == 200, whole.text
        choice = whole.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Let me check.\n"
        calls = choice["message"]["tool_calls"]
        assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in calls] == [("function", "get_weather", {"city": "Paris"}),
                                    ("function", "get_weather", {"city": "Oslo"})]
        streamed = call(engine, "POST", "/v1/chat/completions", settings,
                        json={**body, "stream": True, "tool_choice": "auto"})
        events = sse_events(streamed.text)
        deltas = [e["choices"][0]["delta"] for e in events]
        assert "".join(d.get("content") or "" for d in deltas) == "Let me check.\n"
        streamed_calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in streamed_calls] == [(0, "get_weather", {"city": "Paris"}),
                                             (1, "get_weather", {"city": "Oslo"})]
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert not any("<tool" in (d.get("content") or "") for d in deltas)
        plain = call(engine, "POST", "/v1/chat/completions", settings,
                     json={**body, "tools": None})
        assert plain.json()["choices"][0]["message"] == {
            "role": "assistant", "content": "".join(CALLING_REPLY)}
        assert plain.json()["choices"][0]["finish_reason"] == "stop"
        for choice_value in ("required", {"type": "function", "function": {"name": "f"}}):
            refused = call(engine, "POST", "/v1/chat/completions", settings,
                           json={**body, "tool_choice": choice_value})
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "tool_choice"
            assert "guided decoding" in refused.json()["error"]["message"]
    finally:
        asyncio.run(engine.shutdown(drain=False))


def test_llama3_json_tool_calls_come_out_whole_and_streamed() -> None:
    fake = FakeEngine()
    fake.reply = ['{"name": "get_weather", ', '"parameters": {"city": ', '"Oslo"}}']
    engine = start_async_engine(fake)
    settings = ServerSettings(tool_call_parser="llama3_json")
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS,
            "max_tokens": 10}
    try:
        choice = call(engine, "POST", "/v1/chat/completions", settings,
                      json=body).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in choice["message"]["tool_calls"]] == [("get_weather", {"city": "Oslo"})]
        events = sse_events(call(engine, "POST", "/v1/chat/completions", settings,
                                 json={**body, "stream": True}).text)
        deltas = [e["choices"][0]["delta"] for e in events]
        assert not any(d.get("content") for d in deltas)
        assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == [
            "get_weather"]
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        asyncio.run(engine.shutdown(drain=False))


THINKING_REPLY = ["<think>", "\nWeather needs", " a tool.\n</th", "ink>\n\n",
                  "<tool_call>", '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                  "</tool_call>"]


def test_a_reasoning_parser_splits_the_thinking_from_the_answer() -> None:
    """--reasoning-parser qwen3 with hermes tool calls, as vLLM serves Qwen3: the thinking
    comes out as `reasoning` (and `reasoning_content`), whole and streamed, the calls after
    it as tool_calls; `enable_thinking: false` leaves the answer unsplit."""
    fake = FakeEngine()
    fake.reply = THINKING_REPLY
    engine = start_async_engine(fake)
    settings = ServerSettings(tool_call_parser="hermes", reasoning_parser="qwen3")
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS,
            "max_tokens": 20}
    try:
        message = call(engine, "POST", "/v1/chat/completions", settings,
                       json=body).json()["choices"][0]["message"]
        assert message["reasoning"] == message["reasoning_content"] == (
            "\nWeather needs a tool.\n")
        assert message["content"] == "\n\n"
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
        events = sse_events(call(engine, "POST", "/v1/chat/completions", settings,
                                 json={**body, "stream": True}).text)
        deltas = [e["choices"][0]["delta"] for e in events]
        assert "".join(d.get("reasoning", "") for d in deltas) == "\nWeather needs a tool.\n"
        assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
        assert "".join(d.get("content") or "" for d in deltas) == "\n\n"
        assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == [
            "get_weather"]
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
        off = call(engine, "POST", "/v1/chat/completions", settings, json={
            **body, "tools": None, "max_tokens": 8,
            "chat_template_kwargs": {"enable_thinking": False}})
        assert off.json()["choices"][0]["message"] == {
            "role": "assistant", "content": "".join(THINKING_REPLY)}
    finally:
        asyncio.run(engine.shutdown(drain=False))


def test_tool_calls_and_tool_call_ids_reach_the_template(engine: AsyncEngine) -> None:
    # A conversation that called a tool: the assistant turn's tool_calls (content null) and
    # the tool turn's tool_call_id are what tool-aware templates (Qwen's, Llama 3.1's)
    # render; dropping them would run a prompt in which the tool answers a call never made.
    # Arguments come as OpenAI's JSON string and reach the template as the object
    # transformers' templates expect (as vLLM parses them).
    seen: list[list[dict[str, Any]]] = []
    render = engine.tokenizer.apply_chat_template  # type: ignore[union-attr]

    def recording(messages: list[dict[str, Any]], *args: Any, **kwargs: Any) -> str:
        seen.append(messages)
        return render([{**m, "role": "user"} for m in messages], *args, **kwargs)

    engine.tokenizer.apply_chat_template = recording  # type: ignore[union-attr]
    call_ = {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Z\u00fcrich"}'}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call_]},
                {"role": "tool", "content": "21", "tool_call_id": "call_1"}]
    for path, extra in (("/v1/chat/completions", {"max_completion_tokens": 1}),
                        ("/tokenize", {})):
        response = call(engine, "POST", path, json={"messages": messages, **extra})
        assert response.status_code == 200, response.text
        assistant, tool = seen[-1][1], seen[-1][2]
        assert assistant["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
            "name": "weather", "arguments": {"city": "Zürich"}}}]
        assert tool["tool_call_id"] == "call_1"
    bad = {**call_, "function": {"name": "weather", "arguments": "{not json"}}
    refused = call(engine, "POST", "/v1/chat/completions", json={"messages": [
        messages[0], {"role": "assistant", "tool_calls": [bad]}]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages.1.tool_calls.0.function.arguments"


def test_chat_continues_the_final_message_when_asked(engine: AsyncEngine) -> None:
    # vLLM's continue_final_message: the prompt ends inside the client's begun answer, and
    # the completion is the continuation only; /tokenize renders the same ids.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Pa"}]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    chat = call(engine, "POST", "/v1/chat/completions",
                json={"messages": messages, "max_completion_tokens": 2, **flags})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len("<user>hi<assistant>Pa")
    assert chat.json()["choices"][0]["message"]["content"] == "t0 t1 "
    tokens = call(engine, "POST", "/tokenize", json={"messages": messages, **flags})
    assert tokens.json()["tokens"] == [ord(c) for c in "<user>hi<assistant>Pa"]


def test_continuous_usage_stats_put_each_choices_usage_in_its_chunks(
        engine: AsyncEngine) -> None:
    # vLLM's continuous_usage_stats (with include_usage): each choice chunk carries that
    # choice's prompt and the tokens its chunks have carried so far; the last chunk sums all.
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body, prompt_tokens in (
            ("/v1/completions", {"prompt": "abc"}, 3),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
             len("<user>hi<assistant>"))):
        response = call(engine, "POST", path, json={
            **body, "max_tokens": 3, "n": 2, "stream": True, "stream_options": options})
        events = sse_events(response.text)
        for index in (0, 1):
            usages = [e["usage"] for e in events[:-1] if e["choices"][0]["index"] == index]
            assert all(u["prompt_tokens"] == prompt_tokens for u in usages)
            counts = [u["completion_tokens"] for u in usages]
            assert counts == sorted(counts) and counts[-1] == 3
            assert all(u["total_tokens"] == prompt_tokens + u["completion_tokens"]
                       for u in usages)
            if "chat" in path:
                assert counts[0] == 0  # the role chunk: nothing generated yet
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    plain = call(engine, "POST", "/v1/completions", json={
        "prompt": "abc", "max_tokens": 2, "stream": True,
        "stream_options": {"continuous_usage_stats": True}})  # without include_usage: none
    assert all("usage" not in e for e in sse_events(plain.text))


def test_truncate_prompt_tokens_keeps_the_prompts_end(engine: AsyncEngine) -> None:
    # vLLM's: the last k tokens run (the echo shows them), in completions and chat alike.
    completion = call(engine, "POST", "/v1/completions", json={
        "prompt": "abcdef", "max_tokens": 1, "echo": True, "truncate_prompt_tokens": 3})
    assert completion.json()["usage"]["prompt_tokens"] == 3
    assert completion.json()["choices"][0]["text"] == "deft0 "
    chat = call(engine, "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 1,
        "truncate_prompt_tokens": 5})
    assert chat.json()["usage"]["prompt_tokens"] == 5
    whole = call(engine, "POST", "/v1/completions", json={
        "prompt": "abcdef", "max_tokens": 1, "truncate_prompt_tokens": -1})
    assert whole.json()["usage"]["prompt_tokens"] == 6  # shorter than the context: all of it


def test_detokenize_keeps_special_tokens(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/detokenize", json={"tokens": [1, 104, 105]})
    assert response.status_code == 200 and response.json() == {"prompt": "\x01hi"}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400,
     "messages"),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
    ("/tokenize", {"messages": []}, 400, None),
    ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"prompt": 5}, 400, None),
    ("/detokenize", {"tokens": [-1]}, 400, None),
    ("/detokenize", {"tokens": [0x110000]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, None),
    ("/detokenize", {"tokens": [1], "model": "other"}, 404, "model"),
])
def test_bad_tokenize_bodies_are_openai_errors(engine: AsyncEngine, path: str,
                                               body: dict[str, Any], status: int,
                                               param: str | None) -> None:
    response = call(engine, "POST", path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_penalties_min_p_logit_bias_allowed_ids_and_bad_words_reach_the_engine() -> None:
    engine, _, received = recording_engine()
    try:
        for path, body in (("/v1/completions", {"prompt": "ab"}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "ab"}]})):
            response = call(engine, "POST", path, json={
                **body, "max_tokens": 1, "presence_penalty": 0.5, "frequency_penalty": -0.25,
                "repetition_penalty": 1.1, "min_p": 0.05, "response_format": {"type": "text"},
                # vLLM extras at their defaults are accepted
                "use_beam_search": None, "skip_special_tokens": True, "min_tokens": 1,
                "logit_bias": {"9": -100, "3": 2.5}, "bad_words": ["no", " way"],
                "allowed_token_ids": [3, 9, 11]})
            assert response.status_code == 200, response.text
            params = received[-1]
            assert (params.presence_penalty, params.frequency_penalty,
                    params.repetition_penalty, params.min_p,
                    params.min_tokens) == (0.5, -0.25, 1.1, 0.05, 1)
            assert params.logit_bias == ((3, 2.5), (9, -100.0))
            assert params.allowed_token_ids == (3, 9, 11) and params.skip_special_tokens
            assert params.bad_words == ("no", " way")  # the engine tokenises them
        blank = call(engine, "POST", "/v1/completions",
                     json={"prompt": "ab", "max_tokens": 1, "bad_words": ["ok", " "]})
        assert blank.status_code == 400 and blank.json()["error"]["param"] == "bad_words"
        kept = call(engine, "POST", "/v1/completions",
                    json={"prompt": "ab", "max_tokens": 1, "skip_special_tokens": False})
        assert kept.status_code == 200 and received[-1].skip_special_tokens is False
    finally:
        asyncio.run(engine.shutdown(drain=False))


def recording_engine() -> tuple[AsyncEngine, FakeEngine, list[Any]]:
    """A started AsyncEngine over a FakeEngine whose add_request records each params."""
    fake = FakeEngine()
    received: list[Any] = []
    add_request = fake.add_request

    def recording_add(prompt: Any, params: Any, *args: Any, **kwargs: Any) -> str:
        received.append(params)
        return add_request(prompt, params, *args, **kwargs)

    fake.add_request = recording_add  # type: ignore[method-assign]
    return start_async_engine(fake), fake, received


def test_unset_sampling_fields_take_the_models_generation_config() -> None:
    """As vLLM's --generation-config auto: a request's own values win, the fields it leaves
    out take the model's recommended ones, and max_new_tokens caps max_tokens."""
    fake = FakeEngine()
    fake.sampling_defaults = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, min_p=0.05,
                                              repetition_penalty=1.1, max_tokens=5)
    add_request = fake.add_request
    received: list[SamplingParams] = []
    fake.add_request = lambda prompt, params, *a, **k: (  # type: ignore[method-assign]
        received.append(params) or add_request(prompt, params, *a, **k))
    engine = start_async_engine(fake)
    chat = {"messages": [{"role": "user", "content": "ab"}]}
    try:
        for path, body in (("/v1/completions", {"prompt": "ab"}), ("/v1/chat/completions", chat)):
            assert call(engine, "POST", path, json=body).status_code == 200
            params = received[-1]
            assert (params.temperature, params.top_p, params.top_k, params.min_p,
                    params.repetition_penalty, params.max_tokens) == (0.7, 0.8, 20, 0.05, 1.1, 5)
            own = call(engine, "POST", path, json={
                **body, "temperature": 0, "top_p": 1, "top_k": -1, "min_p": 0,
                "repetition_penalty": 1, "max_tokens": 12})
            assert own.status_code == 200, own.text
            params = received[-1]
            assert (params.temperature, params.top_p, params.top_k, params.min_p,
                    params.repetition_penalty, params.max_tokens) == (0, 1, -1, 0, 1, 5)
        # A min_tokens beyond the capped max_tokens is the request's error, by name.
        refused = call(engine, "POST", "/v1/completions",
                       json={"prompt": "ab", "min_tokens": 8, "max_tokens": 10})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "min_tokens"
    finally:
        asyncio.run(engine.shutdown(drain=False))


def test_a_cache_salt_reaches_the_engine_with_every_choice() -> None:
    fake = FakeEngine()
    engine = start_async_engine(fake)
    chat = {"messages": [{"role": "user", "content": "ab"}]}
    try:
        for path, body in (("/v1/completions", {"prompt": ["ab", "cd"]}),
                           ("/v1/chat/completions", chat)):
            done = call(engine, "POST", path, json={**body, "max_tokens": 1, "n": 2,
                                                    "cache_salt": "s3cret"})
            assert done.status_code == 200, done.text
        assert fake.cache_salts == ["s3cret"] * 6
        assert call(engine, "POST", "/v1/completions",
                    json={"prompt": "ab", "max_tokens": 1}).status_code == 200
        assert fake.cache_salts[-1] is None
        for bad in ("", 5):
            refused = call(engine, "POST", "/v1/completions",
                           json={"prompt": "ab", "cache_salt": bad})
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "cache_salt"
    finally:
        asyncio.run(engine.shutdown(drain=False))


def test_n_choices_are_engine_requests_sharing_the_prompt() -> None:
    engine, _, received = recording_engine()
    try:
        response = call(engine, "POST", "/v1/completions",
                        json={"prompt": "abc", "max_tokens": 2, "n": 3, "seed": 5})
        body = response.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert all(c["text"] == "t0 t1 " for c in body["choices"])
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
        assert [p.seed for p in received] == [5, 6, 7]  # distinct samples per choice
        top = call(engine, "POST", "/v1/completions",
                   json={"prompt": "a", "max_tokens": 1, "n": 2, "seed": 2**64 - 1})
        assert top.status_code == 200 and [p.seed for p in received[-2:]] == [2**64 - 1, 0]
    finally:
        asyncio.run(engine.shutdown(drain=False))


def test_n_choices_reach_the_engine_together() -> None:
    # One engine turn takes them all; added one after another, each waited for a step
    # (n=128 took seconds before its first byte).
    fake = FakeEngine(step_delay_s=0.02)
    steps = [0]
    seen_at: list[int] = []
    launch_step, add_request = fake.launch_step, fake.add_request

    def counting_launch() -> Any:
        steps[0] += 1
        return launch_step()

    def recording_add(*args: Any, **kwargs: Any) -> str:
        seen_at.append(steps[0])
        return add_request(*args, **kwargs)

    fake.launch_step = counting_launch  # type: ignore[method-assign]
    fake.add_request = recording_add  # type: ignore[method-assign]
    engine = start_async_engine(fake)
    try:
        response = call(engine, "POST", "/v1/completions",
                        json={"prompt": "abc", "max_tokens": 2, "n": 16})
        assert response.status_code == 200 and len(response.json()["choices"]) == 16
        assert len(seen_at) == 16 and max(seen_at) - min(seen_at) <= 1, seen_at
    finally:
        asyncio.run(engine.shutdown(drain=False))


def test_n_choices_stream_with_their_index_and_one_usage(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2, "n": 2,
        "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(response.text)
    for index in (0, 1):
        deltas = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == index]
        # The role first, then one chunk per step, or fewer where the stream fell behind and
        # steps were merged (a loaded machine): the text is the same either way.
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert all(d["delta"].keys() == {"content"} for d in deltas[1:])
        assert "".join(d["delta"]["content"] for d in deltas[1:]) == "t0 t1 "
        assert [d["finish_reason"] for d in deltas[1:]] == \
            [None] * (len(deltas) - 2) + ["length"]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 4
    assert events[-1]["usage"]["prompt_tokens"] == len("<user>hi<assistant>")


def test_n_choices_all_go_when_one_cannot_be_added() -> None:
    # The queue holds three waiting requests and one waits already: the third choice is
    # refused, and the two added before it must not run on for nobody.
    fake = FakeEngine(max_running=0)
    engine = start_async_engine(fake, max_waiting_requests=3)
    app = create_app(engine)

    async def go() -> httpx.Response:
        waiting = await engine.add_request([5, 6], SamplingParams(max_tokens=2))
        while engine.snapshot().stats.num_waiting < 1:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v1/completions",
                                         json={"prompt": "abc", "max_tokens": 2, "n": 3})
        waiting.close()
        return response

    try:
        response = asyncio.run(go())
        assert response.status_code == 503, response.text
        assert_all_aborted(fake, 3)  # the two choices, and the request that waited
    finally:
        asyncio.run(engine.shutdown(drain=False))


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "abc", "n": 3}, "n"), ({"prompt": ["a", "b"], "n": 2}, "prompt"),
    ({"prompt": [[5], [6], [7]]}, "prompt")])
def test_more_choices_than_the_queue_ever_takes_are_a_400(body: dict[str, Any],
                                                          param: str) -> None:
    # However idle the server, it never accepts them: a 503 "retry later" would be a lie
    # (OpenAI's client retries a 503). Nothing reaches the engine.
    fake = FakeEngine()
    engine = start_async_engine(fake, max_waiting_requests=2)
    try:
        response = call(engine, "POST", "/v1/completions", json={**body, "max_tokens": 2})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "--max-waiting-requests" in error["message"]
        assert not fake.requests and not fake.aborted
        chat = call(engine, "POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 3})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "n"
        fits = call(engine, "POST", "/v1/completions", json={"prompt": "abc", "n": 2,
                                                             "max_tokens": 1})
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 2
    finally:
        asyncio.run(engine.shutdown(drain=False))


def assert_all_aborted(fake: FakeEngine, count: int) -> None:
    """The engine aborts `count` requests (the dispatch is asynchronous) and keeps none."""
    deadline = time.monotonic() + 5
    while len(fake.aborted) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fake.aborted) == count and not fake.requests


def test_an_engine_refusal_names_its_param() -> None:
    # The engine checks what only it knows (its vocabulary): its refusal's field is the
    # error's param, as for the refusals the front end finds itself.
    fake = FakeEngine()
    add_request = fake.add_request

    def refusing_add(prompt: Any, params: SamplingParams, *args: Any, **kwargs: Any) -> str:
        if params.logit_bias:
            raise InvalidRequestError("logit_bias token id 999 is outside the vocabulary",
                                      param="logit_bias")
        return add_request(prompt, params, *args, **kwargs)

    fake.add_request = refusing_add  # type: ignore[method-assign]
    engine = start_async_engine(fake)
    try:
        response = call(engine, "POST", "/v1/completions",
                        json={"prompt": "x", "logit_bias": {"999": 1}})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "logit_bias"
    finally:
        asyncio.run(engine.shutdown(drain=False))


def test_a_batch_the_engine_refuses_in_part_leaves_nothing_running() -> None:
    # Prompt 2 is refused only by the engine, after prompt 1's choices were added with it:
    # the whole request is a 400, and prompt 1's choices are aborted, not left to run.
    fake = FakeEngine(max_running=0)
    add_request = fake.add_request

    def refusing_add(prompt: Any, *args: Any, **kwargs: Any) -> str:
        if 999 in prompt:
            raise InvalidRequestError("token id 999 is outside the vocabulary")
        return add_request(prompt, *args, **kwargs)

    fake.add_request = refusing_add  # type: ignore[method-assign]
    engine = start_async_engine(fake)
    try:
        response = call(engine, "POST", "/v1/completions",
                        json={"prompt": [[5, 6], [999]], "max_tokens": 2, "n": 2})
        assert response.status_code == 400 and "999" in response.json()["error"]["message"]
        assert_all_aborted(fake, 2)
    finally:
        asyncio.run(engine.shutdown(drain=False))


def test_a_batch_streams_each_choice_under_its_index(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/completions", json={
        "prompt": ["ab", "cde"], "max_tokens": 2, "n": 2, "stream": True, "echo": True,
        "stream_options": {"include_usage": True}})
    events = sse_events(response.text)
    texts = ["".join(e["choices"][0]["text"] for e in events[:-1]
                     if e["choices"][0]["index"] == index) for index in range(4)]
    assert texts == ["abt0 t1 ", "abt0 t1 ", "cdet0 t1 ", "cdet0 t1 "]
    assert events[-1]["usage"]["prompt_tokens"] == 5  # each prompt once
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_template_failure_is_a_400(engine: AsyncEngine) -> None:
    response = call(engine, "POST", "/v1/chat/completions",
                    json={"messages": [{"role": "tool", "content": "x"}]})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]


@pytest.mark.parametrize(("extra", "status"), [
    ({"top_logprobs": 2}, 400), ({"logprobs": False, "top_logprobs": 2}, 400),
    ({"logprobs": None, "top_logprobs": 1}, 400),
    ({"top_logprobs": 2, "stream": True}, 400),
    ({"top_logprobs": 0}, 200), ({"logprobs": False, "top_logprobs": 0}, 200),
    ({"logprobs": True, "top_logprobs": 0}, 200),
])
def test_chat_top_logprobs_needs_logprobs_true_unless_zero(engine: AsyncEngine,
                                                           extra: dict[str, Any],
                                                           status: int) -> None:
    """vLLM's ChatCompletionRequest.check_logprobs refuses `top_logprobs` without
    `logprobs: true` only when it would list something: its condition is
    `(top_logprobs == -1 or top_logprobs > 0) and not data.get("logprobs")`. So a positive
    value with `logprobs` false, null or absent is a 400 naming top_logprobs (streamed or
    not), while `top_logprobs: 0` is accepted whatever `logprobs` says and, without it,
    returns no logprobs. (kvtier refuses -1 earlier, as a negative count.)"""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}
    response = call(engine, "POST", "/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["param"] == "top_logprobs"
    elif not extra.get("logprobs"):
        assert response.json()["choices"][0]["logprobs"] is None


def test_timeouts_are_408_or_an_error_event() -> None:
    engine = start_async_engine(FakeEngine(step_delay_s=0.01), request_timeout_s=0.1)
    plain = call(engine, "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 60})
    assert plain.status_code == 408 and plain.json()["error"]["code"] == "request_timeout"
    streamed = call(engine, "POST", "/v1/completions",
                    json={"prompt": "x", "max_tokens": 60, "stream": True})
    events = sse_events(streamed.text)
    assert events[-1]["error"]["code"] == "request_timeout"
    assert events[0]["choices"][0]["text"] == "t0 "
    asyncio.run(engine.shutdown(drain=False))


def test_body_cap_with_and_without_content_length(engine: AsyncEngine) -> None:
    settings = ServerSettings(max_request_body_bytes=100)
    big = json.dumps({"prompt": "x" * 200}).encode()
    assert call(engine, "POST", "/v1/completions", settings, content=big).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 50):
            yield big[i:i + 50]

    response = call(engine, "POST", "/v1/completions", settings, content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == \
        "request_too_large"
    small = call(engine, "POST", "/v1/completions", settings, json={"prompt": "x"})
    assert small.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_a_body_not_sent_as_json_is_told_so(engine: AsyncEngine, path: str,
                                            content_type: str) -> None:
    # FastAPI hands a body of another media type to the model as raw bytes, whose error
    # ("Input should be a valid dictionary...") says nothing of the cause: a JSON body sent
    # as text/plain, or as a form by `curl -d`. As vLLM, name the content type.
    body = (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}' if "chat" in path
            else b'{"prompt": "x", "max_tokens": 1}')
    response = call(engine, "POST", path, content=body, headers={"content-type": content_type})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "application/json" in message and content_type in message
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    for json_type in ("application/json", "application/json; charset=utf-8"):
        sent = call(engine, "POST", path, content=body, headers={"content-type": json_type})
        assert sent.status_code == 200, sent.text


def test_api_key_guards_v1_only(engine: AsyncEngine) -> None:
    settings = ServerSettings(api_key="k")
    assert call(engine, "GET", "/v1/models", settings).status_code == 401
    assert call(engine, "GET", "/v1/models", settings,
                headers={"Authorization": "Bearer k"}).status_code == 200
    for path in ("/health", "/metrics", "/version", "/openapi.json"):
        assert call(engine, "GET", path, settings).status_code == 200, path


def test_browsers_on_other_origins_may_call_as_vllms_defaults_allow(engine: AsyncEngine) -> None:
    """CORS as vLLM sets it up: a preflight is answered without the API key, and every
    response (a 401 too) tells the browser it may read it; narrowed origins are kept to."""
    settings = ServerSettings(api_key="k")
    preflight = call(engine, "OPTIONS", "/v1/completions", settings, headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    for headers, status in (({}, 401), ({"Authorization": "Bearer k"}, 200)):
        response = call(engine, "GET", "/v1/models", settings,
                        headers={"Origin": "http://ui.example", **headers})
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-origin" not in call(engine, "GET", "/health").headers
    narrow = ServerSettings(allowed_origins=("http://ui.example",), allow_credentials=True)
    mine = call(engine, "GET", "/v1/models", narrow, headers={"Origin": "http://ui.example"})
    assert mine.headers["access-control-allow-origin"] == "http://ui.example"
    assert mine.headers["access-control-allow-credentials"] == "true"
    other = call(engine, "OPTIONS", "/v1/models", narrow, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


def test_reset_prefix_cache_answers_what_the_engine_did() -> None:
    fake = FakeEngine()
    engine = start_async_engine(fake)
    fake.reset_result = PrefixCacheReset(True, device_blocks=7, tier_entries=2)
    done = call(engine, "POST", "/reset_prefix_cache?reset_external=true")
    assert done.status_code == 200 and done.json() == {"device_blocks": 7, "tier_entries": 2}
    fake.reset_result = PrefixCacheReset(False, reason="requests are unfinished (2)")
    busy = call(engine, "POST", "/reset_prefix_cache")
    assert busy.status_code == 409
    assert busy.json()["error"] == {
        "message": "prefix cache not reset: requests are unfinished (2)",
        "type": "conflict_error", "param": None, "code": "requests_unfinished"}
    assert fake.resets == [True, False]
    settings = ServerSettings(api_key="k")  # an admin route: behind the key, unlike /health
    assert call(engine, "POST", "/reset_prefix_cache", settings).status_code == 401
    assert call(engine, "POST", "/reset_prefix_cache", settings,
                headers={"Authorization": "Bearer k"}).status_code == 409
    assert fake.resets == [True, False, False]
    asyncio.run(engine.shutdown(drain=False))
    gone = call(engine, "POST", "/reset_prefix_cache")
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "shutting_down"


def test_metrics_names_and_tier_labels(engine: AsyncEngine) -> None:
    app = create_app(engine)
    call(app, "POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    chat = call(app, "POST", "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert chat.status_code == 200
    snapshot = engine.snapshot()
    snapshot.stats.tiers = {"cpu": TierStats(num_loaded_bytes=10, num_errors=1,
                                             used_bytes=3 << 20, capacity_bytes=8 << 20)}
    snapshot.stats.tier_manager = ManagerStats(hit_tokens={"cpu": 48},  # reloads included
                                               reuse_rate=0.25, store_min_hits=2)
    snapshot.stats.num_tier_hit_tokens = {"cpu": 32}  # prompt tokens served, once each
    snapshot.stats.num_steps = 7
    snapshot.stats.num_decode_only_steps, snapshot.stats.num_prompt_steps = 5, 2
    snapshot.stats.decode_only_step_seconds, snapshot.stats.prompt_step_seconds = 0.02, 0.25
    text = call(app, "GET", "/metrics").text
    samples = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                     if k != "model_name"))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("kvtier:generation_tokens_total", ())] == 3
    assert samples[("kvtier:engine_steps_total", ())] == 7
    assert samples[("kvtier:engine_decode_only_steps_total", ())] == 5
    assert samples[("kvtier:engine_prompt_steps_total", ())] == 2
    assert samples[("kvtier:engine_decode_only_step_seconds_total", ())] == 0.02
    assert samples[("kvtier:engine_prompt_step_seconds_total", ())] == 0.25
    assert samples[("kvtier:request_success_total", (("finished_reason", "length"),))] == 2
    assert samples[("kvtier:time_to_first_token_seconds_count", ())] == 2
    assert samples[("kvtier:inter_token_latency_seconds_count", ())] == 1
    # Both routes time their tokenisation (the chat one includes its template).
    assert samples[("kvtier:request_tokenize_time_seconds_count", ())] == 2
    assert 0 < samples[("kvtier:request_tokenize_time_seconds_sum", ())] \
        <= samples[("kvtier:time_to_first_token_seconds_sum", ())]
    assert samples[("kvtier:tier_hit_tokens_total", (("tier", "cpu"),))] == 32
    assert samples[("kvtier:tier_loaded_bytes_total", (("tier", "cpu"),))] == 10
    assert samples[("kvtier:tier_errors_total", (("tier", "cpu"),))] == 1
    assert samples[("kvtier:tier_used_bytes", (("tier", "cpu"),))] == 3 << 20
    assert samples[("kvtier:tier_capacity_bytes", (("tier", "cpu"),))] == 8 << 20
    assert samples[("kvtier:tier_reuse_rate", ())] == 0.25
    assert samples[("kvtier:tier_store_min_hits", ())] == 2
    assert samples[("kvtier:kv_cache_total_blocks", ())] == 100
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_hits_total", "prefix_cache_queries_total", "prompt_tokens_total"):
        assert ("kvtier:" + name, ()) in samples, name


@pytest.mark.parametrize(("served", "label"), [((), "fake-model"),
                                                (("alias", "other"), "alias")])
def test_every_metric_is_labelled_with_the_served_model_name(
        engine: AsyncEngine, served: tuple[str, ...], label: str) -> None:
    """As vLLM's `model_name` label: the served model name (the first of several), on every
    series. Before, kvtier's series had no model_name label."""
    app = create_app(engine, ServerSettings(served_model_names=served))
    assert call(app, "POST", "/v1/completions",
                json={"prompt": "abc", "max_tokens": 2}).status_code == 200
    engine.snapshot().stats.tiers = {"cpu": TierStats()}
    engine.snapshot().stats.tier_manager = ManagerStats()
    families = list(text_string_to_metric_families(call(app, "GET", "/metrics").text))
    names = {f.name for f in families}
    assert {"kvtier:num_requests_running", "kvtier:tier_hit_tokens",
            "kvtier:time_to_first_token_seconds", "kvtier:request_success"} <= names
    samples = [s for f in families for s in f.samples]
    assert samples and all(s.labels.get("model_name") == label for s in samples), \
        [s for s in samples if s.labels.get("model_name") != label][:3]
    ttft = {s.name: s.value for s in samples if s.name.startswith("kvtier:time_to_first")}
    assert ttft["kvtier:time_to_first_token_seconds_count"] == 1
    tier = [s for s in samples if s.name == "kvtier:tier_used_bytes"]
    assert [s.labels for s in tier] == [{"model_name": label, "tier": "cpu"}]


def tokenize_count(app: FastAPI) -> float:
    text = call(app, "GET", "/metrics").text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "kvtier:request_tokenize_time_seconds_count")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x" * 80}, "prompt"),  # 81 tokens past max_model_len 64
    ("/v1/completions", {"prompt": "abc", "max_tokens": 100}, "max_tokens"),
    ("/v1/completions", {"prompt": "abc", "logit_bias": {"seven": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 80}]},
     "messages"),
])
def test_requests_refused_after_tokenising_are_not_timed(
        engine: AsyncEngine, path: str, body: dict[str, Any], param: str) -> None:
    """The tokenisation histogram counts the requests the engine took, as vLLM's per-request
    histograms count only requests that reach its engine. Before, a request refused (400)
    after its tokenisation was counted too."""
    app = create_app(engine)
    refused = call(app, "POST", path, json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param, \
        refused.text
    assert tokenize_count(app) == 0
    accepted = call(app, "POST", path, json={
        **{k: v for k, v in body.items() if k not in ("max_tokens", "logit_bias")},
        "prompt" if "prompt" in body else "messages":
            "abc" if "prompt" in body else [{"role": "user", "content": "hi"}],
        "max_tokens": 2})
    assert accepted.status_code == 200, accepted.text
    assert tokenize_count(app) == 1


def test_health_turns_503_when_the_engine_stops(engine: AsyncEngine) -> None:
    assert call(engine, "GET", "/health").status_code == 200
    asyncio.run(engine.shutdown(drain=False))
    assert call(engine, "GET", "/health").status_code == 503
    late = call(engine, "POST", "/v1/completions", json={"prompt": "x"})
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
