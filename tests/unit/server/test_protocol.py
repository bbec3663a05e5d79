"""Pure parts: request models, unsupported features, error mapping."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kvtier.engine.async_engine import EngineClosedError, QueueFullError, RequestAbortedError
from kvtier.server.errors import from_engine_error, validation_message
from kvtier.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DeltaMessage,
    unsupported_fields,
)
from kvtier.types import InvalidRequestError


@pytest.mark.parametrize("prompt", ["text", [1, 2], ["text"], [[1, 2]]])
def test_prompt_shapes_accepted(prompt: object) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize("body", [
    {"prompt": [1, True]}, {"prompt": [1.5]}, {"prompt": 3}, {"prompt": "x", "top_p": 0},
    {"prompt": "x", "temperature": float("inf")}, {"prompt": "x", "seed": 2**64},
    {"prompt": "x", "stop": ["a"] * 17}, {"prompt": "x", "stop_token_ids": [-1]},
])
def test_bad_completion_fields_rejected(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_unknown_fields_ignored_and_defaults() -> None:
    body = CompletionRequest.model_validate({"prompt": "x", "frobnicate": 1})
    assert body.max_tokens == 16 and body.temperature is None and not body.include_usage
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": None}], "stream_options": {
            "include_usage": True}})
    assert chat.messages[0].text() == "" and chat.include_usage


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_fields_we_cannot_honour_are_refused_not_ignored(body: dict, param: str) -> None:
    """stream_options without stream is a 400 in OpenAI's API and vLLM's."""
    found = unsupported_fields(CompletionRequest.model_validate(body))
    assert found is not None and found[0] == param
    assert unsupported_fields(CompletionRequest.model_validate(
        {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})) is None
    for logprobs in (0, 5):  # 0 asks for the sampled token's logprob alone
        assert unsupported_fields(CompletionRequest.model_validate(
            {"prompt": "x", "logprobs": logprobs})) is None
    assert unsupported_fields(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
         "top_logprobs": 3})) is None


def test_unsupported_fields_name_the_param() -> None:
    assert unsupported_fields(CompletionRequest.model_validate({"prompt": "x"})) is None
    assert unsupported_fields(CompletionRequest.model_validate(
        {"prompt": "x", "frequency_penalty": 0.0, "echo": False, "best_of": 1})) is None
    found = unsupported_fields(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}))
    assert found is not None and found[0] == "tools"


def test_delta_drops_unset_fields() -> None:
    assert json.loads(DeltaMessage().model_dump_json()) == {}
    assert json.loads(DeltaMessage(content="a").model_dump_json()) == {"content": "a"}


def test_validation_message_points_at_the_param() -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": "lots"})
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    message, param = validation_message(errors)
    assert param == "max_tokens" and message.startswith("max_tokens: ")
    assert validation_message([{"type": "json_invalid", "loc": ("body", 3)}])[1] is None
    assert validation_message([{"type": "missing", "loc": ("body", "prompt")}]) == (
        "missing required parameter 'prompt'", "prompt")
    # A query parameter (POST /reset_prefix_cache?reset_external=maybe) is named as sent.
    assert validation_message([{"type": "bool_parsing", "loc": ("query", "reset_external"),
                                "msg": "Input should be a valid boolean"}]) == (
        "reset_external: Input should be a valid boolean", "reset_external")


@pytest.mark.parametrize(("body", "expected"), [
    ({"prompt": "x", "stop": ["a"] * 17},
     ("stop: List should have at most 16 items after validation, not 17", "stop")),
    ({"prompt": [[1, "a"]]}, ("prompt.0.1: Input should be a valid integer", "prompt.0.1")),
])
def test_union_fields_report_the_real_problem(body: dict, expected: tuple[str, str]) -> None:
    """A value that fits no member of a union type used to be reported by its first member
    ("stop.str: Input should be a valid string (and 1 more errors)" for 17 stop strings)."""
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    assert validation_message(errors) == expected


def test_engine_errors_map_to_statuses() -> None:
    assert from_engine_error(InvalidRequestError("bad")).status == 400
    full = from_engine_error(QueueFullError(7, retry_after_s=2))
    assert full.status == 503 and full.headers["Retry-After"] == "2"
    assert from_engine_error(EngineClosedError("bye")).status == 503
    assert from_engine_error(RequestAbortedError("timeout", None, "slow")).status == 408
    assert from_engine_error(RequestAbortedError("shutdown", None, "bye")).status == 503
    assert from_engine_error(RuntimeError("bug")).status == 500
    body = from_engine_error(InvalidRequestError("\ud800 lone surrogate")).response().body
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_an_assistant_turns_reasoning_reaches_the_template_as_reasoning_content() -> None:
    """Qwen3's template renders earlier thinking from `reasoning_content`; clients send it
    under vLLM's new name or the old one."""
    for field in ("reasoning", "reasoning_content"):
        message = ChatMessage.model_validate({"role": "assistant", "content": "4",
                                              field: "2 + 2"})
        assert message.for_template()["reasoning_content"] == "2 + 2"
    assert ChatMessage.model_validate({"role": "user", "content": "hi"}).for_template()[
        "reasoning_content"] is None
