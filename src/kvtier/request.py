"""The engine's live record of one request (layer 1: plain data, no torch, no other layers).

Owned by the scheduler; the KV manager reads its tokens and memoises its block hashes on it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvtier.types import BlockHash, FinishReason, RequestMetrics, SamplingParams, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"
    """Waiting for KV blocks to arrive from a lower tier."""
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    hash_root: BlockHash | None = None
    """Parent of the request's first block hash: None = the engine's; salted by vLLM's
    `cache_salt`, so only requests with the same salt share cached KV (device and tiers)."""

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    """One per output token when sampling_params.logprobs is set."""
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    """Prompt tokens 1, 2, ... computed so far when sampling_params.prompt_logprobs is set."""
    num_computed_tokens: int = 0
    num_inflight_tokens: int = 0
    """Tokens scheduled in launched steps whose results are not applied yet (async
    scheduling schedules a step while the one before it runs)."""
    num_pending_outputs: int = 0
    """Tokens those steps sample, not yet known on the host: the next step's input for this
    request is the last of them, read by the runner on the device (`PENDING_TOKEN_ID`)."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)
    """Hashes of the full blocks of all_token_ids computed so far (memoised by the KV manager)."""
    num_tier_handled_blocks: int = 0
    """Blocks already offered to the tiers by write-through."""
    tier_noted: bool = False
    """Whether the tiers counted this request's chunks for admission."""
    short_prefill_waited: bool = False
    """A long prefill already held back once for short ones (`short_prefill_first_tokens`)."""
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time,
                                      num_prompt_tokens=len(self.prompt_token_ids))

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_unscheduled_tokens(self) -> int:
        """Tokens (known or pending) that no step has been given to compute yet."""
        return (self.num_tokens + self.num_pending_outputs
                - self.num_computed_tokens - self.num_inflight_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop_token(self) -> FinishReason | None:
        """Token-level stop conditions after the last appended token (stop strings are
        checked on text by the output processor)."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if not params.ignore_eos and last in self.eos_token_ids:
            self.stop_reason = None
            return FinishReason.STOP
        if last in params.stop_token_ids:
            self.stop_reason = last
            return FinishReason.STOP
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
