"""Seeded request generators for the serving benchmark, and the tokenizer they share.

Owns the synthetic workloads of BRIEF §3: `prefix_repetition` and `random` follow vLLM's
`vllm bench serve` generators step for step (same RNG calls in the same order, so the same seed
and tokenizer give vLLM's prompts); `multi_turn` and `long_doc_qa` follow LMCache's and vLLM's
multi-turn benchmarks in spirit. ShareGPT lives in `sharegpt.py`.

Token ids are drawn at random, decoded to text and re-encoded until the text has the wanted token
length (vLLM's `gen_prompt_decode_to_target_len`): servers receive text, and random ids rarely
survive a decode/encode round trip unchanged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kvtier.utils.tokenizer_json import HFTokenizer, load_tokenizer

__all__ = [
    "Conversation", "HFTokenizer", "LongDocQAParams", "MultiTurnParams", "PrefixRepetitionParams",
    "RandomParams", "SampleRequest", "TokenizerLike", "Workload", "decode_to_target_len",
    "load_tokenizer", "sample_long_doc_qa", "sample_multi_turn", "sample_prefix_repetition",
    "sample_random",
]


class TokenizerLike(Protocol):
    """What the generators need; `HFTokenizer` (and any HF tokenizer) satisfies it."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class SampleRequest:
    """One request to send: vLLM's `SampleRequest`, text-only."""

    prompt: str | list[int]
    """Text, or token ids for /v1/completions."""
    prompt_len: int
    """Prompt tokens as the generator counted them (the server's usage count wins later)."""
    expected_output_len: int
    """Sent as max_tokens."""
    request_id: str | None = None
    multi_modal_data: None = None


@dataclass(frozen=True)
class Conversation:
    """A multi-turn chat: the client sends turn t with the model's real answers to turns < t."""

    conversation_id: str
    system_prompt: str
    """Shared by every conversation of a workload; empty means no system message."""
    system_prompt_len: int
    user_turns: tuple[str, ...]
    user_turn_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    """max_tokens of each turn."""

    @property
    def num_turns(self) -> int:
        return len(self.user_turns)


@dataclass
class Workload:
    """Everything a run sends: single requests, or conversations, plus unmeasured warm-ups."""

    requests: list[SampleRequest] = field(default_factory=list)
    conversations: list[Conversation] = field(default_factory=list)
    warmup_requests: list[SampleRequest] = field(default_factory=list)
    """Sent and completed before the measured phase (LMCache's long_doc_qa warm-up round)."""

    @property
    def num_measured(self) -> int:
        """Requests the figures cover: one per single request, one per conversation turn."""
        return len(self.requests) + sum(c.num_turns for c in self.conversations)


@dataclass(frozen=True)
class PrefixRepetitionParams:
    """vLLM `--prefix-repetition-*` defaults."""

    prefix_len: int = 256
    suffix_len: int = 256
    num_prefixes: int = 10
    output_len: int = 128


@dataclass(frozen=True)
class RandomParams:
    """vLLM `--random-*` defaults."""

    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 0


@dataclass(frozen=True)
class MultiTurnParams:
    """Conversations of `num_turns` turns behind one shared system prompt."""

    num_turns: int = 4
    system_prompt_len: int = 512
    input_len: int = 128
    """User tokens added per turn."""
    output_len: int = 128
    range_ratio: float = 0.0
    """Per-turn lengths are uniform in [len·(1−r), len·(1+r)], as in `random`."""


@dataclass(frozen=True)
class LongDocQAParams:
    """LMCache `long_doc_qa` defaults (`--num-documents 8 --document-length 20000 …`)."""

    num_documents: int = 8
    document_length: int = 20000
    repeat_count: int = 2
    repeat_mode: str = "random"
    """random (seeded shuffle) | tile ([1,2,3,1,2,3]) | interleave ([1,1,2,2,3,3])."""
    output_len: int = 100
    hit_miss_ratio: tuple[int, int] | None = None
    """(h, m): within every h+m queries, the last m get a random marker in front: forced misses."""
    question_len: int = 0
    """Random tokens after the document, different per query; 0 repeats the document (LMCache)."""
    warmup_round: bool = True
    """Send each document once, unmeasured, before the queries (LMCache's warm-up round)."""


DrawFn = Callable[[int], list[int]]


def decode_to_target_len(
    tokenizer: TokenizerLike, token_ids: list[int], target_len: int, draw: DrawFn,
    max_retry: int = 10,
) -> tuple[str, list[int], int]:
    """Decode ids to text whose re-encoding has `target_len` tokens: (text, ids, mismatch).

    Mirrors vLLM: decode, re-encode; pad with `draw(n)` fresh ids or truncate; retry up to
    `max_retry` times; `mismatch` is the final length minus the target (0 on success).
    """
    remaining = max_retry
    mismatch = 0
    while True:
        prompt = tokenizer.decode(token_ids)
        token_ids = tokenizer.encode(prompt, add_special_tokens=False)
        if remaining <= 0:
            mismatch = len(token_ids) - target_len
            break
        if len(token_ids) == target_len:
            break
        if len(token_ids) < target_len:
            token_ids.extend(draw(target_len - len(token_ids)))
        else:
            token_ids = token_ids[:target_len]
        remaining -= 1
    return prompt, token_ids, mismatch


def sample_prefix_repetition(
    tokenizer: TokenizerLike, num_requests: int, params: PrefixRepetitionParams, seed: int = 0,
    disable_shuffle: bool = False,
) -> list[SampleRequest]:
    """`num_prefixes` random prefixes, each followed by `num_requests // num_prefixes` suffixes.

    vLLM's construction: ids from the legacy global numpy stream (here a RandomState with the same
    seed), prompt = decode(prefix ids + suffix ids), prompt_len = len(prefix + suffix), then one
    seeded `random.shuffle`. The text of the prefix is shared exactly; the server may re-tokenize
    a few tokens differently where prefix and suffix meet.
    """
    per_prefix = num_requests // params.num_prefixes
    if per_prefix == 0:
        raise ValueError(f"num_requests ({num_requests}) must be >= num_prefixes "
                         f"({params.num_prefixes})")
    state = np.random.RandomState(seed)
    vocab_size = tokenizer.vocab_size

    def draw(n: int) -> list[int]:
        return state.randint(0, vocab_size, size=n).tolist()

    def exact(length: int) -> list[int]:
        return decode_to_target_len(tokenizer, draw(length), length, draw)[1]

    requests = []
    for _ in range(params.num_prefixes):
        prefix_ids = exact(params.prefix_len)
        for _ in range(per_prefix):
            ids = prefix_ids + exact(params.suffix_len)
            requests.append(SampleRequest(tokenizer.decode(ids), len(ids), params.output_len))
    if not disable_shuffle:
        random.Random(seed).shuffle(requests)
    return requests


def _length_bounds(length: int, range_ratio: float, minimum: int = 0) -> tuple[int, int]:
    """vLLM's integer range around `length`: [floor(l·(1−r)), ceil(l·(1+r))], at least minimum."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low = max(math.floor(length * (1 - range_ratio)), minimum)
    high = max(math.ceil(length * (1 + range_ratio)), minimum)
    return low, high


def _allowed_ids(tokenizer: TokenizerLike) -> np.ndarray:
    """Base-vocabulary ids minus special tokens, ascending (vLLM's `allowed_tokens`)."""
    special = list(getattr(tokenizer, "all_special_ids", []))
    return np.setdiff1d(np.arange(tokenizer.vocab_size), np.asarray(special, dtype=np.int64))


def _num_special_tokens(tokenizer: TokenizerLike) -> int:
    counter = getattr(tokenizer, "num_special_tokens_to_add", None)
    return int(counter()) if counter else 0


def sample_random(
    tokenizer: TokenizerLike, num_requests: int, params: RandomParams, seed: int = 0,
    request_id_prefix: str = "",
) -> list[SampleRequest]:
    """vLLM's `random` dataset: a shared random prefix, then a run of consecutive allowed ids.

    Lengths are uniform in `range_ratio` around the means; each prompt's inner sequence starts
    at a random offset and steps through the allowed ids, then is fixed to length by
    `decode_to_target_len` drawing from the same `default_rng(seed)`.
    """
    real_input_len = max(0, params.input_len - _num_special_tokens(tokenizer))
    in_low, in_high = _length_bounds(real_input_len, params.range_ratio)
    out_low, out_high = _length_bounds(params.output_len, params.range_ratio, minimum=1)
    if params.prefix_len + in_low < 1:
        raise ValueError("random input length too small: prefix_len + sampled input < 1 token")
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(in_low, in_high + 1, size=num_requests)
    output_lens = rng.integers(out_low, out_high + 1, size=num_requests)
    offsets = rng.integers(0, tokenizer.vocab_size, size=num_requests)
    allowed = _allowed_ids(tokenizer)
    prefix = (allowed[rng.integers(0, len(allowed), size=params.prefix_len)].tolist()
              if params.prefix_len > 0 else [])

    def draw(n: int) -> list[int]:
        return rng.integers(0, tokenizer.vocab_size, size=n).tolist()

    requests = []
    for i in range(num_requests):
        inner = allowed[(int(offsets[i]) + i + np.arange(int(input_lens[i]))) % len(allowed)]
        target = params.prefix_len + int(input_lens[i])
        prompt, ids, _ = decode_to_target_len(tokenizer, prefix + inner.tolist(), target, draw)
        requests.append(SampleRequest(prompt, len(ids), int(output_lens[i]),
                                      request_id=f"{request_id_prefix}{i}"))
    return requests


def _random_text(tokenizer: TokenizerLike, rng: np.random.Generator, allowed: np.ndarray,
                 length: int) -> str:
    """Text of exactly `length` tokens (when the round trip allows) from allowed random ids."""
    if length <= 0:
        return ""

    def draw(n: int) -> list[int]:
        return allowed[rng.integers(0, len(allowed), size=n)].tolist()

    return decode_to_target_len(tokenizer, draw(length), length, draw)[0]


def sample_multi_turn(
    tokenizer: TokenizerLike, num_conversations: int, params: MultiTurnParams, seed: int = 0,
) -> list[Conversation]:
    """Conversations with a shared system prompt and random user turns.

    History grows each turn with the model's real answers, so the client (not this generator)
    builds the messages; the prefix a server can reuse grows from the system prompt to the whole
    previous exchange.
    """
    if params.num_turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {params.num_turns}")
    rng = np.random.default_rng(seed)
    allowed = _allowed_ids(tokenizer)
    system = _random_text(tokenizer, rng, allowed, params.system_prompt_len)
    in_low, in_high = _length_bounds(params.input_len, params.range_ratio, minimum=1)
    out_low, out_high = _length_bounds(params.output_len, params.range_ratio, minimum=1)
    conversations = []
    for c in range(num_conversations):
        user_lens = rng.integers(in_low, in_high + 1, size=params.num_turns).tolist()
        output_lens = rng.integers(out_low, out_high + 1, size=params.num_turns).tolist()
        turns = tuple(_random_text(tokenizer, rng, allowed, n) for n in user_lens)
        conversations.append(Conversation(
            f"conv-{c}", system, params.system_prompt_len if system else 0, turns,
            tuple(int(n) for n in user_lens), tuple(int(n) for n in output_lens)))
    return conversations


def repeat_documents(indices: list[int], repeat_count: int, mode: str,
                     rnd: random.Random) -> list[int]:
    """LMCache's `repeat_prompts` on document indices (random = one shuffle of the tiling)."""
    if mode == "tile":
        return indices * repeat_count
    if mode == "interleave":
        return [i for i in indices for _ in range(repeat_count)]
    if mode == "random":
        order = indices * repeat_count
        rnd.shuffle(order)
        return order
    raise ValueError(f"repeat_mode {mode!r} is not one of random, tile, interleave")


def sample_long_doc_qa(
    tokenizer: TokenizerLike, params: LongDocQAParams, seed: int = 0,
) -> Workload:
    """N documents of L tokens, each asked `repeat_count` times in tile/interleave/random order.

    The query order is LMCache's for the same seed (`random.Random(seed)` replays its
    `random.seed(shuffle_seed)` + `shuffle`). Documents are random-token text of exactly L
    tokens rather than LMCache's "hi hi hi…", so no document is a prefix of another.
    """
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    allowed = _allowed_ids(tokenizer)
    docs = [_random_text(tokenizer, rng, allowed, params.document_length)
            for _ in range(params.num_documents)]
    order = repeat_documents(list(range(params.num_documents)), params.repeat_count,
                             params.repeat_mode, rnd)
    queries = []
    for q, doc in enumerate(order):
        prompt, prompt_len = docs[doc], params.document_length
        if params.question_len > 0:
            prompt += _random_text(tokenizer, rng, allowed, params.question_len)
            prompt_len += params.question_len
        if params.hit_miss_ratio and q % sum(params.hit_miss_ratio) >= params.hit_miss_ratio[0]:
            marker = f"{rnd.randint(-10_000_000, 10_000_000)} "
            prompt = marker + prompt
            prompt_len += len(tokenizer.encode(marker, add_special_tokens=False))
        queries.append(SampleRequest(prompt, prompt_len, params.output_len,
                                     request_id=f"doc{doc}-q{q}"))
    warmups = ([SampleRequest(d, params.document_length, params.output_len,
                              request_id=f"doc{i}-warmup") for i, d in enumerate(docs)]
               if params.warmup_round else [])
    return Workload(requests=queries, warmup_requests=warmups)
