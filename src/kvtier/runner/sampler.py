"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seeded RNG stream.

Greedy rows are one argmax over the batch. Random rows are filtered and sampled on the logits'
device; a request with a seed owns a torch.Generator that lives as long as the request (so its
tokens do not depend on what else is in the batch, nor on preemption); unseeded requests share
the engine's generator.
"""

from __future__ import annotations

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
                     params: list[SamplingParams]) -> torch.Tensor:
        """logits: (n, vocab) float32, one row per request -> one token id per row, (n,) int64
        on the logits' device, not yet synchronised with the host."""
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        for row in random_rows:
            p = params[row]
            probs = _filtered_probs(logits[row], p)
            generator = self._generator(request_ids[row], p)
            tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
        return tokens


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits / params.temperature
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
