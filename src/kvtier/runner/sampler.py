"""Token sampling: penalties, greedy, temperature, min-p, top-k, top-p, with a per-request
seeded RNG stream.

Rows whose requests ask for penalties (presence, frequency: OpenAI's, over the output so far;
repetition: vLLM's and HF's, over prompt and output) get them first, in place, greedy rows
included. Greedy rows are then one argmax over the batch. Random rows are filtered and sampled
on the logits' device, in vLLM's order (temperature, min-p, then top-k and top-p); a request
with a seed owns a torch.Generator that lives as long as the request (so its tokens do not
depend on what else is in the batch, nor on preemption); unseeded requests share the engine's
generator.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from kvtier.types import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.manual_seed(seed)
        self._per_request: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._per_request.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        generator = self._per_request.get(request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
            self._per_request[request_id] = generator
        return generator

    def sample_async(self, logits: torch.Tensor, request_ids: list[str],
                     params: list[SamplingParams],
                     penalty_contexts: list[tuple[list[int], list[int]] | None] | None = None,
                     ) -> torch.Tensor:
        """logits: (n, vocab) float32, one row per request -> one token id per row, (n,) int64
        on the logits' device, not yet synchronised with the host. `penalty_contexts[i]`:
        (prompt, output) token ids of row i when its params have penalties; those rows of
        `logits` are changed in place."""
        for row, p in enumerate(params):
            if p.has_penalties:
                context = penalty_contexts[row] if penalty_contexts is not None else None
                if context is None:
                    raise ValueError(f"row {row} asks for penalties but has no token context")
                apply_penalties(logits[row], *context, p)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        for row in random_rows:
            p = params[row]
            probs = _filtered_probs(logits[row], p)
            generator = self._generator(request_ids[row], p)
            tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
        return tokens


def apply_penalties(logits: torch.Tensor, prompt: list[int], output: list[int],
                    params: SamplingParams) -> None:
    """One row of logits, in place: the repetition penalty over every token id in the prompt
    or the output, then the frequency and presence penalties over the output's (vLLM's order
    and formulas). The ids go up from pinned memory without blocking the host."""
    device = logits.device
    if params.repetition_penalty != 1.0:
        seen = _upload(sorted(set(prompt).union(output)), device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                   values * params.repetition_penalty)
    if output and (params.frequency_penalty != 0.0 or params.presence_penalty != 0.0):
        counts = Counter(output)
        ids = _upload(list(counts), device)
        occurrences = _upload(list(counts.values()), device).to(logits.dtype)
        logits[ids] -= params.frequency_penalty * occurrences + params.presence_penalty


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":  # a pageable copy would wait for the forward pass in flight
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


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
