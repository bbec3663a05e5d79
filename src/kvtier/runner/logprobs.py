"""Logprobs on the device: vLLM's default "raw" ones, the log-softmax of the model's logits
before penalties, min-tokens masking and temperature.

    StepLogprobs    the sampled token of each row that asks (`SamplingParams.logprobs`):
                    its logprob, its rank, the top k; completed once the tokens are sampled
    PromptLogprobs  vLLM's `prompt_logprobs`: for each prompt position of a prefill chunk,
                    the logprob and rank of the prompt's next token, and the top k

Both are computed when the step is launched and copied into pinned host memory before the
event the step's one synchronisation waits on; `per_row` / `per_request` then read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.types import SamplingParams, ScheduledRequest, TokenLogprobs
from kvtier.utils.device import pinned_copy
from kvtier.utils.device import upload_ids as _upload


@dataclass
class _Scores:
    """Scored tokens of m rows: on the device, then (after `to_host_async` and the step's
    event) in pinned host memory."""

    values: torch.Tensor
    """(m, 1 + k) float32: the scored token's logprob, then the top k's."""
    ranks: torch.Tensor
    """(m,) int64: how many tokens are at least as likely as the scored one."""
    top_ids: torch.Tensor
    """(m, k) int64: the top k's ids, most likely first."""

    def to_host_async(self) -> None:
        """Start the copies to pinned host memory (CUDA); the caller records the event."""
        if self.values.is_cuda:
            self.values = pinned_copy(self.values)
            self.ranks = pinned_copy(self.ranks)
            self.top_ids = pinned_copy(self.top_ids)

    def entries(self, token_ids: list[int], num_top: list[int]) -> list[TokenLogprobs]:
        """Row i's TokenLogprobs for token_ids[i] with its num_top[i] best, once copied."""
        values, ranks, ids = self.values.tolist(), self.ranks.tolist(), self.top_ids.tolist()
        return [TokenLogprobs(token_id=token, logprob=values[i][0], rank=ranks[i],
                              top=tuple(zip(ids[i][:k], values[i][1:1 + k], strict=True)))
                for i, (token, k) in enumerate(zip(token_ids, num_top, strict=True))]


def _score(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> _Scores:
    """logprobs: (m, vocab) float32 log-softmax rows; token_ids: (m,) the token each row
    scores; k: how many of the best to keep."""
    chosen = logprobs.gather(1, token_ids[:, None])
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return _Scores(values=torch.cat([chosen, top.values], dim=1),
                   ranks=(logprobs >= chosen).sum(dim=-1), top_ids=top.indices)


class StepLogprobs:
    """Logprobs of one step's rows that asked for them: taken from the logits when the step
    is launched, scored once the tokens are sampled, then copied to the host with them (no
    synchronisation of their own)."""

    def __init__(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        self.rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        self.num_top = [params[row].logprobs or 0 for row in self.rows]
        self._index = _upload(self.rows, logits.device)
        # float32 (m, vocab): kept until the tokens are known.
        self._logprobs: torch.Tensor | None = (
            logits.index_select(0, self._index).float().log_softmax(-1))
        self.scores: _Scores | None = None

    def attach(self, tokens: torch.Tensor) -> None:
        """Score the sampled tokens; the full rows are dropped."""
        assert self._logprobs is not None, "attach() once"
        self.scores = _score(self._logprobs, tokens.index_select(0, self._index),
                             max(self.num_top))
        self._logprobs = None

    def to_host_async(self) -> None:
        assert self.scores is not None, "attach() first"
        self.scores.to_host_async()

    def per_row(self, tokens: list[int]) -> dict[int, TokenLogprobs]:
        """Row -> its TokenLogprobs, once the copies are done; tokens: the step's samples."""
        assert self.scores is not None
        entries = self.scores.entries([tokens[row] for row in self.rows], self.num_top)
        return dict(zip(self.rows, entries, strict=True))


def step_logprobs(logits: torch.Tensor, params: list[SamplingParams]) -> StepLogprobs | None:
    """The raw logprobs of the rows whose params ask for them (None if none do); call
    before `Sampler.sample_async`, which changes the logits in place."""
    if all(p.logprobs is None for p in params):
        return None
    return StepLogprobs(logits, params)


PROMPT_ROWS_PER_SLICE = 256
"""Prompt rows turned into full-vocabulary logits at a time. A slice holds ~9 bytes per
(row, vocabulary entry): the float32 logits, their log-softmax and the rank comparison, 350 MB
at Qwen's 152k; `runner.memory` keeps that room."""
PROMPT_SLICE_BYTES_PER_ENTRY = 9


class PromptLogprobs:
    """vLLM's prompt logprobs for the prefill chunks of one step: for each scored position,
    the logprob and rank of the prompt token there given the tokens before it (read from the
    row before it), and the top k. Computed from the step's hidden states in slices."""

    def __init__(self, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                 hidden: torch.Tensor, query_start: list[int],
                 requests: list[ScheduledRequest]) -> None:
        self.request_ids: list[str] = []
        self.targets: list[tuple[int, ...]] = []
        self.num_top: list[int] = []
        rows: list[int] = []
        for i, scheduled in enumerate(requests):
            if not scheduled.prompt_logprob_targets:
                continue
            first = query_start[i] + scheduled.prompt_logprob_first_row
            rows.extend(range(first, first + len(scheduled.prompt_logprob_targets)))
            self.request_ids.append(scheduled.request_id)
            self.targets.append(scheduled.prompt_logprob_targets)
            self.num_top.append(scheduled.sampling_params.prompt_logprobs or 0)
        device = hidden.device
        row_index = _upload(rows, device)
        target_index = _upload([t for targets in self.targets for t in targets], device)
        k = max(self.num_top)
        slices = []
        for start in range(0, len(rows), PROMPT_ROWS_PER_SLICE):
            part = slice(start, start + PROMPT_ROWS_PER_SLICE)
            logprobs = compute_logits(hidden[row_index[part]]).float().log_softmax(-1)
            slices.append(_score(logprobs, target_index[part], k))
        self.scores = _Scores(torch.cat([s.values for s in slices]),
                              torch.cat([s.ranks for s in slices]),
                              torch.cat([s.top_ids for s in slices]))

    def to_host_async(self) -> None:
        self.scores.to_host_async()

    def per_request(self) -> dict[str, list[TokenLogprobs]]:
        """Request id -> its entries in prompt order, once the copies are done."""
        entries = self.scores.entries(
            [t for targets in self.targets for t in targets],
            [k for targets, k in zip(self.targets, self.num_top, strict=True)
             for _ in targets])
        result: dict[str, list[TokenLogprobs]] = {}
        row = 0
        for request_id, targets in zip(self.request_ids, self.targets, strict=True):
            result[request_id] = entries[row:row + len(targets)]
            row += len(targets)
        return result


def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor],
                    hidden: torch.Tensor, query_start: list[int],
                    requests: list[ScheduledRequest]) -> PromptLogprobs | None:
    """The step's prompt logprobs (None if no chunk scores prompt positions); `hidden`: the
    step's flattened hidden states, request i's rows from query_start[i]."""
    if not any(s.prompt_logprob_targets for s in requests):
        return None
    return PromptLogprobs(compute_logits, hidden, query_start, requests)
