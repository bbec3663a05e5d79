"""Plain data passed between layers: sampling parameters, scheduler and runner outputs, results.

Nothing here imports torch. The scheduler hands the runner a `SchedulerOutput` of ids and counts;
the runner answers with a `ModelRunnerOutput`; the engine turns those into `RequestOutput`s.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import NewType

BlockId = NewType("BlockId", int)
BlockHash = NewType("BlockHash", bytes)


class InvalidRequestError(ValueError):
    """A request cannot be served as given; the message names the bad value. Nothing was queued.

    `param`, when known, is the request field at fault (the OpenAI error's `param`). It is an
    instance attribute, so it survives pickling (a refusal crosses the engine's pipe)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; validated on construction (vLLM names and defaults)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 or 0 = all tokens."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token the output already holds."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per occurrence of the token in the output so far."""
    repetition_penalty: float = 1.0
    """vLLM's (as HF's): the logits of tokens in the prompt or the output are divided by it
    where positive, multiplied where negative; 1 = off."""
    min_p: float = 0.0
    """vLLM's: tokens less likely than min_p times the most likely one are not sampled."""
    min_tokens: int = 0
    """vLLM's: the first min_tokens outputs cannot be EOS or a stop token id, and no stop
    string ends in their text."""
    logprobs: int | None = None
    """vLLM's: None = none; k >= 0 = each output token's log-probability and rank, with the
    k most likely tokens' (the engine caps k at its max_logprobs)."""
    prompt_logprobs: int | None = None
    """vLLM's: None = none; k >= 0 = each prompt token's (but the first) log-probability and
    rank given the tokens before it, with the k most likely tokens'. Such a request computes
    its whole prompt: it takes no prefix-cache or tier hits."""
    skip_special_tokens: bool = True
    """vLLM's: special tokens are left out of the output text (false: written out)."""
    allowed_token_ids: tuple[int, ...] | None = None
    """vLLM's: the only ids the sampler may pick (None: all), before any other filter."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """OpenAI's: (token id, bias in [-100, 100]) pairs added to those tokens' logits before
    penalties and sampling, as in vLLM (logprobs stay the raw ones); a mapping is accepted."""
    bad_words: tuple[str, ...] = ()
    """vLLM's: words the output may not hold. The engine tokenises each (alone, and after a
    space where that is another sequence of as many tokens) into `bad_words_token_ids`."""
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    """Token sequences the output may not end with: the last token of each is not sampled
    while the output so far ends with the others (a one-token sequence: never). Filled from
    `bad_words` by the engine; may be given directly."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if isinstance(self.allowed_token_ids, list | set | frozenset):
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        elif self.bad_words is None or isinstance(self.bad_words, list):  # None: vLLM's default
            object.__setattr__(self, "bad_words", tuple(self.bad_words or ()))
        if isinstance(self.bad_words_token_ids, list):
            object.__setattr__(self, "bad_words_token_ids", tuple(
                tuple(ids) if isinstance(ids, list) else ids for ids in self.bad_words_token_ids))
        pairs = list(self.logit_bias.items() if isinstance(self.logit_bias, Mapping)
                     else self.logit_bias or ())
        with contextlib.suppress(TypeError):  # keys that are no token ids: refused below
            pairs.sort()
        object.__setattr__(self, "logit_bias", tuple(
            tuple(pair) if isinstance(pair, tuple | list) else (pair,) for pair in pairs))
        self._validate()

    def _validate(self) -> None:
        def bad(message: str) -> InvalidRequestError:
            return InvalidRequestError(message)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0 \
                or self.temperature != self.temperature:
            raise bad(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad(f"top_k must be -1 (disabled) or an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):
            raise bad(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.n != 1:
            raise bad(f"n must be 1, got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0 \
                or self.repetition_penalty == float("inf"):
            raise bad(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) \
                or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                      f"got {self.min_tokens!r}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise bad(f"stop strings must be non-empty strings, got {stop!r}")
        for token_id in self.stop_token_ids:
            if not isinstance(token_id, int) or token_id < 0:
                raise bad(f"stop_token_ids must be non-negative integers, got {token_id!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise bad(f"{name} must be None or an integer >= 0, got {value!r}")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad(f"skip_special_tokens must be true or false, got "
                      f"{self.skip_special_tokens!r}")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, tuple):
                raise bad(f"allowed_token_ids must be a list of token ids, got "
                          f"{self.allowed_token_ids!r}")
            if not self.allowed_token_ids:
                raise bad("allowed_token_ids must name at least one token id")
            for token_id in self.allowed_token_ids:
                if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                    raise bad(f"allowed_token_ids must be token ids (integers >= 0), got "
                              f"{token_id!r}")
        for pair in self.logit_bias:
            token_id, value = pair if len(pair) == 2 else (None, None)
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise bad(f"logit_bias keys must be token ids (integers >= 0), got {pair!r}")
            if not _is_number(value) or not -100.0 <= value <= 100.0:
                raise bad(f"logit_bias values must be in [-100, 100], got {value!r} for "
                          f"token {token_id}")
        if len({token_id for token_id, _ in self.logit_bias}) != len(self.logit_bias):
            raise bad("logit_bias names a token id twice")
        if not isinstance(self.bad_words, tuple):
            raise bad(f"bad_words must be a list of strings, got {self.bad_words!r}")
        for word in self.bad_words:
            if not isinstance(word, str) or not word.strip():
                raise bad(f"bad_words must be strings with a non-space character, got {word!r}")
            if not _is_unicode(word):  # the engine could not tokenise it
                raise bad(f"bad_words must be valid Unicode text (no lone surrogates), got "
                          f"{word!r}")
        if not isinstance(self.bad_words_token_ids, tuple):
            raise bad(f"bad_words_token_ids must be a list of token id lists, got "
                      f"{self.bad_words_token_ids!r}")
        for ids in self.bad_words_token_ids:
            if not isinstance(ids, tuple) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise bad(f"bad_words_token_ids must hold non-empty lists of token ids "
                          f"(integers >= 0), got {ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @functools.cached_property  # asked per request per step (the params are frozen)
    def has_penalties(self) -> bool:
        """Whether the logits depend on the tokens seen so far (the sampler needs them)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @functools.cached_property
    def needs_token_context(self) -> bool:
        """Whether the sampler needs the request's tokens so far: penalties, or bad words
        longer than one token."""
        return self.has_penalties or any(len(ids) > 1 for ids in self.bad_words_token_ids)


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8: a lone surrogate (which JSON can carry as an escape)
    does not, and tokenizers refuse it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass(slots=True)  # one per request per step: a frozen init costs ~1 µs more
class ScheduledRequest:
    """One request's share of a step.

    `token_ids` are the tokens computed this step, at positions
    `num_computed_tokens .. num_computed_tokens + len(token_ids) - 1`; `block_ids` is the whole
    block table after this step's allocation (the scheduler's own list: read it before the next
    `schedule()`, never modify it). `sample` is set when the step reaches the end of
    the request's tokens, so the runner samples the next one. With async scheduling a decode's
    one token may be `PENDING_TOKEN_ID`: the token the previous launched step samples.
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    num_output_tokens: int
    """Output tokens before this step's, counting those still pending (the sampler checks its
    per-request penalty state against it)."""
    penalty_context: tuple[list[int], list[int]] | None = None
    """(prompt, output) token ids of a request whose sampling needs them (penalties, bad words
    of several tokens; the request's own lists, like `block_ids`: read them before the next
    `schedule()`); None otherwise."""
    suppressed_token_ids: tuple[int, ...] = ()
    """Ids the sampled token cannot be (EOS and stop token ids, before min_tokens)."""
    prompt_logprob_targets: tuple[int, ...] = ()
    """prompt_logprobs: the prompt tokens whose logprobs this step computes, predicted by
    rows prompt_logprob_first_row, ... of the chunk (row r predicts the token after it)."""
    prompt_logprob_first_row: int = 0


PENDING_TOKEN_ID = -1
"""A decode's input token that the step before it samples and the host has not read yet
(async scheduling): the runner takes it from that step's sampled tokens on the device."""


@dataclass(frozen=True)
class SchedulerOutput:
    """What the runner computes in one step. Decodes come first, then prefill chunks."""

    requests: list[ScheduledRequest]
    num_scheduled_tokens: int
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests freed since the last step (the runner drops their sampler state)."""


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one output position, from the model's own distribution (vLLM's
    default "raw" logprobs: before penalties, temperature and filtering)."""

    token_id: int
    """The sampled token."""
    logprob: float
    rank: int
    """How many tokens are at least as likely as the sampled one (1: the most likely)."""
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) of the `logprobs` most likely tokens, most likely first."""


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Sampled token per request that sampled this step, and its logprobs where asked for."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per request: the entries of its `prompt_logprob_targets`, in order."""


@dataclass
class RequestMetrics:
    """Timings (seconds, monotonic clock) and counts for one request."""

    arrival_time: float
    queued_time: float | None = None
    """When the engine core received the request (vLLM's queued timestamp): after the front
    end's parsing and tokenisation and the hop to the core."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (device and tiers) on first scheduling."""
    num_tier_hit_tokens: dict[str, int] = field(default_factory=dict)
    """Prompt tokens loaded from each lower tier ("cpu", "disk", "redis")."""
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    """All output ids; while the request streams this is the engine's live list."""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    """One entry per output token when the request asked for logprobs, else None."""


@dataclass
class RequestOutput:
    """A request's state after a step; `finished` once it will produce nothing more."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    new_text: str = ""
    """Text added by this step (streaming)."""
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    """Logprobs of new_token_ids (when the request asked for them)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first
    (nothing predicts it), as vLLM's. Set on the first output and the final one; shorter
    only in the final output of a request aborted before its prompt was computed."""

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens


@dataclass(frozen=True)
class PrefixCacheReset:
    """What `reset_prefix_cache` did: nothing (`reset` False, `reason` says why) or forgot the
    device's cached blocks and, when asked, every entry of the KV tiers."""

    reset: bool
    device_blocks: int = 0
    """Cached device blocks forgotten."""
    tier_entries: int = 0
    """Tier entries dropped (chunks of KV in host memory, on disk or in Redis)."""
    reason: str | None = None


@dataclass
class OutputDelta:
    """One request's progress in one step: what is new since its previous delta."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    metrics: RequestMetrics | None
    """On the first and the last delta (they change in between only when preempted, which
    the last one reports), so a step's update does not pickle a copy per request."""
    final_text: str | None = None
    """The whole output text, on the last delta only."""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    """On the request's first delta only."""
    new_logprobs: list[TokenLogprobs] | None = None
    """Logprobs of new_token_ids, when the request asked for them."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """On the request's first delta only, when it asked for them."""

    def __reduce__(self) -> tuple[type[OutputDelta], tuple[object, ...]]:
        # By position, not as a __dict__ per object: a quarter of the default's load time
        # and half its dump. A step's update sends its deltas as columns
        # (core_messages.CoreUpdate); this serves those sent alone (an abort's last output).
        return type(self), _output_delta_fields(self)


_output_delta_fields = operator.attrgetter(*(f.name for f in fields(OutputDelta)))
