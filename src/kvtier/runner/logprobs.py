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

import torch

from kvtier.types import SamplingParams, TokenLogprobs
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
