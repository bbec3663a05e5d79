"""Token sampling: penalties, greedy, temperature, min-p, top-k, top-p, with a per-request
seeded RNG stream.

Rows whose requests ask for penalties (presence, frequency: OpenAI's, over the output so far;
repetition: vLLM's and HF's, over prompt and output) get them first, in place, greedy rows
included. Each such request keeps its tokens on the device, as vLLM does: a mask of the ids
seen in its prompt or output and the counts of its output's, built once from its token lists
and then updated with each sampled token without the host, so a step costs a few small
kernels per row whatever the prompt's length. Greedy rows are then one argmax over the batch.
Random rows are filtered and sampled on the logits' device, in vLLM's order (temperature,
min-p, then top-k and top-p); a request with a seed owns a torch.Generator that lives as long
as the request (so its tokens do not depend on what else is in the batch, nor on preemption);
unseeded requests share the engine's generator.

Logprobs (`kvtier.runner.logprobs`) are taken from the logits before `sample_async` changes
them in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtier.types import SamplingParams
from kvtier.utils.device import upload_ids as _upload

LOGIT_BOUND = 1e30
"""Penalised logits are kept within +-LOGIT_BOUND: a repetition penalty near 0 (or huge)
would otherwise make them infinite or NaN (0 * inf), and one such row fails the sampling of
the whole step. Far beyond any real logit, and still finite after the smallest temperature."""


@dataclass
class _PenaltyState:
    """One request's tokens on the device, for its penalties."""

    seen: torch.Tensor | None
    """bool (vocab,): ids in the prompt or the output (repetition penalty), else None."""
    counts: torch.Tensor | None
    """float32 (vocab,): occurrences in the output (presence, frequency), else None."""
    num_output_tokens: int
    """Output tokens folded in: the lists are read again when the request's differs."""


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.manual_seed(seed)
        self._per_request: dict[str, torch.Generator] = {}
        self._penalties: dict[str, _PenaltyState] = {}

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._per_request.pop(request_id, None)
            self._penalties.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        generator = self._per_request.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
            self._per_request[request_id] = generator
        return generator

    @torch.inference_mode()  # in place: the decode graphs' logits and the penalty state are
    # inference tensors (captured or built under it), whichever path the step took
    def sample_async(self, logits: torch.Tensor, request_ids: list[str],
                     params: list[SamplingParams],
                     penalty_contexts: list[tuple[list[int], list[int]] | None] | None = None,
                     suppressed: list[tuple[int, ...]] | None = None) -> torch.Tensor:
        """logits: (n, vocab) float32, one row per request -> one token id per row, (n,) int64
        on the logits' device, not yet synchronised with the host. `penalty_contexts[i]`:
        (prompt, output) token ids of row i when its params have penalties; `suppressed[i]`:
        ids row i cannot sample (min_tokens). Those rows of `logits` are changed in place."""
        penalised: list[tuple[int, _PenaltyState]] = []
        for row, p in enumerate(params):
            if p.has_penalties:
                context = penalty_contexts[row] if penalty_contexts is not None else None
                if context is None:
                    raise ValueError(f"row {row} asks for penalties but has no token context")
                state = self._penalty_state(request_ids[row], p, *context, logits.shape[-1],
                                            logits.device)
                apply_penalties(logits[row], state.seen, state.counts, p)
                penalised.append((row, state))
        vocab = logits.shape[-1]
        for row, ids in enumerate(suppressed or ()):
            inside = [i for i in ids if i < vocab]  # an EOS id past a model's logits: no-op
            if inside:
                logits[row].index_fill_(0, _upload(inside, logits.device), float("-inf"))
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        for row in random_rows:
            p = params[row]
            probs = _filtered_probs(logits[row], p)
            generator = self._generator(request_ids[row], p)
            tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
        for row, state in penalised:  # the sampled token joins the request's output
            token = tokens[row:row + 1]
            if state.seen is not None:
                state.seen.index_fill_(0, token, True)
            if state.counts is not None:
                state.counts.index_add_(0, token, torch.ones(1, device=token.device))
            state.num_output_tokens += 1
        return tokens

    def _penalty_state(self, request_id: str, params: SamplingParams, prompt: list[int],
                       output: list[int], vocab: int, device: torch.device) -> _PenaltyState:
        """The request's state, built from its token lists the first time (or again if the
        lists moved on without this sampler, which the engine never does)."""
        state = self._penalties.get(request_id)
        if state is not None and state.num_output_tokens == len(output):
            return state
        seen = counts = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[_upload(sorted(set(prompt).union(output)), device)] = True
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            if output:
                counts.index_add_(0, _upload(output, device),
                                  torch.ones(len(output), device=device))
        state = _PenaltyState(seen, counts, len(output))
        self._penalties[request_id] = state
        return state


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor | None,
                    counts: torch.Tensor | None, params: SamplingParams) -> None:
    """One row of logits, in place (vLLM's order and formulas): the repetition penalty over
    the ids in `seen` (prompt or output), then the frequency penalty per occurrence and the
    presence penalty once over the output's `counts`; then bounded (see LOGIT_BOUND)."""
    if seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty,
                                logits * params.repetition_penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    if counts is not None:
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    logits.nan_to_num_(nan=0.0).clamp_(-LOGIT_BOUND, LOGIT_BOUND)


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, min-p, top-k and top-p (nucleus) filtering."""
    logits = logits / params.temperature
    if params.min_p > 0.0:
        # Drop tokens below min_p times the top probability: log p_i < log(min_p) + log p_max.
        logprobs = logits.log_softmax(-1)
        logits = logits.masked_fill(logprobs < logprobs.max() + math.log(params.min_p),
                                    float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p. The most likely token
        # always stays: a top_p that rounds to 0 in float32 (below ~1e-45) would drop it too,
        # and an all -inf row makes multinomial fail the whole step.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(-1)

