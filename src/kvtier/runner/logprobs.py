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

import torch

from kvtier.types import SamplingParams, ScheduledRequest, TokenLogprobs
from kvtier.utils.device import upload_ids as _upload


class StepLogprobs:
    """Logprobs of one step's rows that asked for them: computed on the logits' device when
    the step is launched, completed with the sampled tokens, then copied to the host with
    them (no synchronisation of their own)."""

    def __init__(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        self.rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        self.num_top = [params[row].logprobs or 0 for row in self.rows]
        self._index = _upload(self.rows, logits.device)
        # float32 (m, vocab): kept until the tokens are known, for their logprob and rank.
        self._logprobs: torch.Tensor | None = (
            logits.index_select(0, self._index).float().log_softmax(-1))
        k = min(max(self.num_top), logits.shape[-1])
        top = self._logprobs.topk(k, dim=-1)
        self._top_values = top.values
        self.values: torch.Tensor | None = None
        """(m, 1 + k) float32: the sampled token's logprob, then the top k's."""
        self.top_ids: torch.Tensor = top.indices
        """(m, k) int64: the top k's ids, most likely first."""
        self.ranks: torch.Tensor | None = None
        """(m,) int64: how many tokens are at least as likely as the sampled one."""

    def attach(self, tokens: torch.Tensor) -> None:
        """The sampled tokens' logprobs and ranks; the full rows are dropped."""
        assert self._logprobs is not None, "attach() once"
        sampled = tokens.index_select(0, self._index)
        chosen = self._logprobs.gather(1, sampled[:, None])
        self.ranks = (self._logprobs >= chosen).sum(dim=-1)
        self.values = torch.cat([chosen, self._top_values], dim=1)
        self._logprobs = None

    def to_host_async(self) -> None:
        """Start the copies to pinned host memory (CUDA); the caller records the event."""
        assert self.values is not None and self.ranks is not None, "attach() first"
        if self.values.is_cuda:
            self.values = _pinned_copy(self.values)
            self.ranks = _pinned_copy(self.ranks)
            self.top_ids = _pinned_copy(self.top_ids)

    def per_row(self, tokens: list[int]) -> dict[int, TokenLogprobs]:
        """Row -> its TokenLogprobs, once the copies are done; tokens: the step's samples."""
        assert self.values is not None and self.ranks is not None
        values, ranks, ids = self.values.tolist(), self.ranks.tolist(), self.top_ids.tolist()
        return {row: TokenLogprobs(token_id=tokens[row], logprob=values[i][0], rank=ranks[i],
                                   top=tuple(zip(ids[i][:k], values[i][1:1 + k], strict=True)))
                for i, (row, k) in enumerate(zip(self.rows, self.num_top, strict=True))}


def step_logprobs(logits: torch.Tensor, params: list[SamplingParams]) -> StepLogprobs | None:
    """The raw logprobs of the rows whose params ask for them (None if none do); call
    before `Sampler.sample_async`, which changes the logits in place."""
    if all(p.logprobs is None for p in params):
        return None
    return StepLogprobs(logits, params)


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


PROMPT_ROWS_PER_SLICE = 256
"""Prompt rows turned into full-vocabulary logits at a time: (256, 152k) float32 is 155 MB,
the room the memory plan keeps for a decode batch's logits."""


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
        values, ranks, top_ids = [], [], []
        for start in range(0, len(rows), PROMPT_ROWS_PER_SLICE):
            part = slice(start, start + PROMPT_ROWS_PER_SLICE)
            logprobs = compute_logits(hidden[row_index[part]]).float().log_softmax(-1)
            chosen = logprobs.gather(1, target_index[part, None])
            ranks.append((logprobs >= chosen).sum(dim=-1))
            top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            values.append(torch.cat([chosen, top.values], dim=1))
            top_ids.append(top.indices)
        self.values = torch.cat(values)
        """(rows, 1 + k) float32: the prompt token's logprob, then the top k's."""
        self.ranks = torch.cat(ranks)
        self.top_ids = torch.cat(top_ids)

    def to_host_async(self) -> None:
        """Start the copies to pinned host memory (CUDA); the caller records the event."""
        if self.values.is_cuda:
            self.values = _pinned_copy(self.values)
            self.ranks = _pinned_copy(self.ranks)
            self.top_ids = _pinned_copy(self.top_ids)

    def per_request(self) -> dict[str, list[TokenLogprobs]]:
        """Request id -> its entries in prompt order, once the copies are done."""
        values, ranks, ids = self.values.tolist(), self.ranks.tolist(), self.top_ids.tolist()
        result: dict[str, list[TokenLogprobs]] = {}
        row = 0
        for request_id, targets, k in zip(self.request_ids, self.targets, self.num_top,
                                          strict=True):
            result[request_id] = [
                TokenLogprobs(token_id=token, logprob=values[r][0], rank=ranks[r],
                              top=tuple(zip(ids[r][:k], values[r][1:1 + k], strict=True)))
                for r, token in enumerate(targets, start=row)]
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
