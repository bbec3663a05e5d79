"""The engine's per-token logprobs in OpenAI's two wire shapes, and what a request asks for.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, the top list
holding the `top_logprobs` most likely tokens (OpenAI's meaning; vLLM puts the sampled token
first). Completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (dicts
of the `logprobs` most likely tokens plus the sampled one, as OpenAI documents: up to
logprobs + 1 entries) and `text_offset`.

A token's string is its own decoded text (special tokens kept), as vLLM's; with vLLM's
`return_tokens_as_token_ids` it is "token_id:<id>", so tokens whose bytes are not whole
characters stay distinguishable. `text_offset` adds up those strings' lengths, as vLLM's
non-streaming responses do, in streams too: where a character is split across tokens (each
piece reads U+FFFD), it drifts from the offsets in the output text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.server.errors import OpenAIError
from kvtier.server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatLogprob,
    ChatLogprobContent,
    CompletionLogprobs,
    CompletionRequest,
    PromptLogprob,
)
from kvtier.types import TokenLogprobs

if TYPE_CHECKING:
    from kvtier.model.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0
"""JSON has no -inf: like OpenAI and vLLM, a token the model rules out reports this."""


class TokenStrings:
    """Each id's text and UTF-8 bytes, decoded once per server (one id at a time)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        tokenizer.token_bytes()  # built now (~0.2 s for 150k ids), not in a request's turn

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one instance per server
    def text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def bytes(self, token_id: int) -> list[int]:
        """The token's own bytes where the tokenizer is byte-level (a piece of a character
        included), else its text's."""
        table = self._tokenizer.token_bytes()  # built on first use, then kept
        raw = table[token_id] if table is not None and 0 <= token_id < len(table) else None
        return list(raw if raw is not None else self.text(token_id).encode("utf-8"))


@dataclass(frozen=True)
class LogprobsFormat:
    """How one request wants its logprobs: `num_top` most likely tokens per position."""

    strings: TokenStrings
    num_top: int
    as_token_ids: bool = False

    def name(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_token_ids else self.strings.text(token_id)

    def chat(self, entries: list[TokenLogprobs]) -> ChatChoiceLogprobs:
        return ChatChoiceLogprobs(content=[
            ChatLogprobContent(
                token=self.name(entry.token_id), logprob=_finite(entry.logprob),
                bytes=self.strings.bytes(entry.token_id),
                top_logprobs=[ChatLogprob(token=self.name(token), logprob=_finite(logprob),
                                          bytes=self.strings.bytes(token))
                              for token, logprob in entry.top[:self.num_top]])
            for entry in entries])

    def completion(self, token_ids: list[int], entries: Sequence[TokenLogprobs | None],
                   text_offset: int = 0) -> tuple[CompletionLogprobs, int]:
        """Token i's logprobs from entries[i], offsets counted from `text_offset`; an echoed
        prompt's first token has no entry (nothing predicts it) and gets nulls, as in OpenAI's
        and vLLM's responses. Returns them and the offset after the last token (where a
        stream's next chunk starts)."""
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries, strict=True):
            token = self.name(token_id)
            result.tokens.append(token)
            result.text_offset.append(text_offset)
            text_offset += len(self.strings.text(token_id))
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            top = {self.name(t): _finite(lp) for t, lp in entry.top[:self.num_top]}
            top[token] = _finite(entry.logprob)  # on a name clash, the scored token's value
            result.token_logprobs.append(_finite(entry.logprob))
            result.top_logprobs.append(top)
        return result, text_offset


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def vllm_prompt_logprobs(strings: TokenStrings, entries: list[TokenLogprobs | None],
                         ) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` field: per prompt token, {token id: logprob, rank, text} for
    the top k (ranks 1..k) and the prompt token itself (its own rank)."""
    result: list[dict[int, PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        found = {token: PromptLogprob(logprob=_finite(lp), rank=rank,
                                      decoded_token=strings.text(token))
                 for rank, (token, lp) in enumerate(entry.top, start=1)}
        found[entry.token_id] = PromptLogprob(logprob=_finite(entry.logprob), rank=entry.rank,
                                              decoded_token=strings.text(entry.token_id))
        result.append(found)
    return result


def requested_top(body: CompletionRequest | ChatCompletionRequest,
                  max_logprobs: int) -> int | None:
    """How many most likely tokens a request's logprobs list at each position (None: it asks
    for no logprobs); a value beyond the server's cap, or chat's `top_logprobs` without
    `logprobs`, is refused (400 naming the field)."""
    if isinstance(body, CompletionRequest):
        param, asked = "logprobs", body.logprobs
    else:
        param = "top_logprobs"
        if body.top_logprobs and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs set to true", param=param)
        asked = (body.top_logprobs or 0) if body.logprobs else None
    _check_cap(param, asked, max_logprobs)
    return asked


def requested_prompt_top(body: CompletionRequest, max_logprobs: int) -> int | None:
    """How many most likely tokens to list at each prompt position (None: no prompt
    logprobs): `prompt_logprobs`, or with `echo` the `logprobs` the echoed tokens need."""
    asked = body.prompt_logprobs
    if asked is None and body.echo and body.logprobs is not None:
        asked = body.logprobs
    _check_cap("prompt_logprobs" if body.prompt_logprobs is not None else "logprobs", asked,
               max_logprobs)
    return asked


def _check_cap(param: str, asked: int | None, max_logprobs: int) -> None:
    if asked is not None and asked > max_logprobs:
        raise OpenAIError(400, f"{param} {asked} is more than this server's max_logprobs "
                          f"{max_logprobs} (--max-logprobs)", param=param)
