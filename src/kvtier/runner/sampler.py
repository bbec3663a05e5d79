"""Token sampling: penalties, greedy, temperature, min-p, top-k, top-p, with a per-request
seeded RNG stream.

Rows whose requests ask for penalties (presence, frequency: OpenAI's, over the output so far;
repetition: vLLM's and HF's, over prompt and output) get them first, in place, greedy rows
included. Each such request keeps its tokens on the device, as vLLM does: a mask of the ids
seen in its prompt or output and the counts of its output's, built once from its token lists
and then updated with each sampled token without the host, so a step costs a few small
kernels per row whatever the prompt's length. Greedy rows are then one argmax over the batch.
Random rows are filtered and sampled together on the logits' device, in vLLM's order
(temperature, min-p, then top-k and top-p), with an exponential race as vLLM samples; a
request with a seed owns a torch.Generator that lives as long as the request (so its tokens
do not depend on what else is in the batch, nor on preemption); unseeded requests share the
engine's generator.

Logprobs (`kvtier.runner.logprobs`) are taken from the logits before `sample_async` changes
them in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


@dataclass
class _BadWordsState:
    """One request's bad words of several tokens on the device, with its output's last tokens,
    so that a step bans without the host (which, under async scheduling, does not yet know
    the token sampled last)."""

    prefixes: torch.Tensor
    """int64 (k, width): each sequence's tokens but its last, right-aligned; -1 pads."""
    last_ids: torch.Tensor
    """int64 (k,): each sequence's last token, banned while the output ends with its prefix."""
    tail: torch.Tensor
    """int64 (width,): the output's last `width` tokens; -2 before the output's start."""
    num_output_tokens: int


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.manual_seed(seed)
        self._per_request: dict[str, torch.Generator] = {}
        self._penalties: dict[str, _PenaltyState] = {}
        self._bad_words: dict[str, _BadWordsState] = {}

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._per_request.pop(request_id, None)
            self._penalties.pop(request_id, None)
            self._bad_words.pop(request_id, None)

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
                     suppressed: list[tuple[int, ...]] | None = None,
                     num_output_tokens: list[int] | None = None) -> torch.Tensor:
        """logits: (n, vocab) float32, one row per request -> one token id per row, (n,) int64
        on the logits' device, not yet synchronised with the host. `penalty_contexts[i]`:
        (prompt, output) token ids of row i when its params have penalties; `suppressed[i]`:
        ids row i cannot sample (min_tokens). Rows with allowed ids, a logit bias, penalties,
        bad words or suppressed ids are changed in place.
        `num_output_tokens[i]`: row i's output length before this token, when it counts
        tokens the host has not read yet (async scheduling); default: its output list's."""
        penalised: list[tuple[int, _PenaltyState]] = []
        banning: list[tuple[int, _BadWordsState]] = []
        with_bad_words: list[int] = []
        for row, p in enumerate(params):
            if p.bad_words_token_ids:
                with_bad_words.append(row)  # after penalties, so that a ban stays -inf
            if p.allowed_token_ids is not None:  # first, as vLLM masks them
                keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                keep[_upload(p.allowed_token_ids, logits.device)] = True
                logits[row].masked_fill_(~keep, float("-inf"))
            if p.logit_bias:  # before penalties, as vLLM applies it
                ids, biases = zip(*p.logit_bias, strict=True)
                logits[row].index_add_(0, _upload(ids, logits.device),
                                       _upload(biases, logits.device, logits.dtype))
            if p.has_penalties:
                context = penalty_contexts[row] if penalty_contexts is not None else None
                if context is None:
                    raise ValueError(f"row {row} asks for penalties but has no token context")
                num_outputs = (num_output_tokens[row] if num_output_tokens is not None
                               else len(context[1]))
                state = self._penalty_state(request_ids[row], p, *context, num_outputs,
                                            logits.shape[-1], logits.device)
                penalised.append((row, state))
        if penalised:
            apply_penalties(logits, penalised, params)
        for row in with_bad_words:
            p = params[row]
            single = [ids[0] for ids in p.bad_words_token_ids if len(ids) == 1]
            if single:
                logits[row].index_fill_(0, _upload(single, logits.device), float("-inf"))
            if len(single) < len(p.bad_words_token_ids):
                context = penalty_contexts[row] if penalty_contexts is not None else None
                if context is None:
                    raise ValueError(f"row {row} has bad words but no token context")
                num_outputs = (num_output_tokens[row] if num_output_tokens is not None
                               else len(context[1]))
                words = self._bad_words_state(request_ids[row], p, context[1], num_outputs,
                                              logits.device)
                # The output ends with a sequence's prefix: its last token gets -inf (adding
                # 0 elsewhere, so that sequences sharing a last token do not race).
                match = ((words.prefixes == words.tail) | (words.prefixes < 0)).all(-1)
                logits[row].index_add_(0, words.last_ids, torch.where(
                    match, float("-inf"), 0.0).to(logits.dtype))
                banning.append((row, words))
        vocab = logits.shape[-1]
        for row, ids in enumerate(suppressed or ()):
            inside = [i for i in ids if i < vocab]  # an EOS id past a model's logits: no-op
            if inside:
                logits[row].index_fill_(0, _upload(inside, logits.device), float("-inf"))
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows and len(random_rows) == len(params):
            tokens = self._sample_random(logits, random_rows, request_ids, params)
        else:
            tokens = logits.argmax(dim=-1)
            if random_rows:
                index = _upload(random_rows, logits.device)
                tokens[index] = self._sample_random(logits[index], random_rows, request_ids,
                                                    params)
        for row, state in penalised:  # the sampled token joins the request's output
            token = tokens[row:row + 1]
            if state.seen is not None:
                state.seen.index_fill_(0, token, True)
            if state.counts is not None:
                state.counts.index_add_(0, token, torch.ones(1, device=token.device))
            state.num_output_tokens += 1
        for row, words in banning:
            words.tail.copy_(torch.cat((words.tail[1:], tokens[row:row + 1])))
            words.num_output_tokens += 1
        return tokens

    def _sample_random(self, logits: torch.Tensor, rows: list[int], request_ids: list[str],
                       params: list[SamplingParams]) -> torch.Tensor:
        """One token for each of `rows` (requests with a temperature; `logits`: their rows),
        all at once, in vLLM's order: temperature, min-p, then top-k and top-p over the
        sorted candidates.

        A batch of a few kernels whatever the batch size: row by row, top-p's sort and the
        sampling cost ~10 launches per request, milliseconds of host time at batch 256.
        Sampling is an exponential race (argmax of p / q, q ~ Exp(1) per vocabulary id), which
        picks id i with probability p_i. Each row's q comes from its request's generator (a
        seeded request's own, else the shared one) over the whole vocabulary in id order, so a
        seeded request's tokens depend neither on the batch nor on how wide the candidate list
        is."""
        device = logits.device
        chosen = [params[r] for r in rows]
        x = logits / _per_row([p.temperature for p in chosen], device)
        vocab = x.shape[-1]
        if any(p.min_p > 0.0 for p in chosen):
            # Drop tokens below min_p times the top probability: log p_i < log(min_p) + log
            # p_max (min_p 0: log 0 = -inf drops nothing).
            logprobs = x.log_softmax(-1)
            min_p = _per_row([p.min_p for p in chosen], device)
            floor = logprobs.amax(-1, keepdim=True) + (
                math.log(min_p) if isinstance(min_p, float) else min_p.log())
            x = x.masked_fill(logprobs < floor, float("-inf"))
        noise = self._exponential_noise(rows, request_ids, params, x.shape, device)
        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in chosen]
        filters_top_p = any(p.top_p < 1.0 for p in chosen)
        if max(top_ks) == vocab and not filters_top_p:
            return (x.softmax(-1) / noise).argmax(-1)
        # Candidates sorted by logit, only as many as the widest top-k needs. They give each
        # row a floor value; every token at or above it is kept, so tokens tied with the
        # k-th best are kept with it, as vLLM's and HF's top-k keep them.
        width = max(top_ks)
        if width < vocab:
            candidates = x.topk(width, dim=-1).values
        else:
            candidates = x.sort(dim=-1, descending=True).values
        if min(top_ks) == width:  # the usual batch: one top-k, no index to upload
            floor = candidates[:, width - 1:]
        else:
            floor = candidates.gather(1, _upload([k - 1 for k in top_ks], device)[:, None])
        # The race needs each kept token's probability only up to a factor per row.
        weights = (x - candidates[:, :1]).exp_().masked_fill_(x < floor, 0.0)
        if filters_top_p:
            # Drop a candidate once the mass before it already reaches top_p; the floor
            # becomes the last candidate kept (ties at it stay too). Masses are over the whole
            # top-k set, ties beyond the candidates included. The most likely one always
            # stays: a top_p that rounds to 0 in float32 (below ~1e-45) would drop it too,
            # and an all -inf row has no distribution to sample. Rows without top-p get a
            # bound float32 sums never reach.
            probs = (candidates - candidates[:, :1]).exp_().div_(weights.sum(-1, keepdim=True))
            top_p = _per_row([p.top_p if p.top_p < 1.0 else 2.0 for p in chosen], device)
            kept = ((probs.cumsum(-1) - probs) < top_p).sum(-1, keepdim=True).clamp_(min=1)
            weights.masked_fill_(x < candidates.gather(1, kept - 1), 0.0)
        return weights.div_(noise).argmax(-1)

    def _exponential_noise(self, rows: list[int], request_ids: list[str],
                           params: list[SamplingParams], shape: torch.Size,
                           device: torch.device) -> torch.Tensor:
        """Exp(1) draws, one per (row, vocabulary id): one call from the shared generator for
        the unseeded rows, one per seeded row from its own. Kept above 0, where p / q would
        be inf or NaN."""
        noise = torch.empty(shape, dtype=torch.float32, device=device)
        seeded = [i for i, r in enumerate(rows) if params[r].seed is not None]
        if not seeded:
            noise.exponential_(generator=self._shared)
        else:
            unseeded = [i for i, r in enumerate(rows) if params[r].seed is None]
            if unseeded:
                noise[_upload(unseeded, device)] = torch.empty(
                    (len(unseeded), shape[-1]), dtype=torch.float32,
                    device=device).exponential_(generator=self._shared)
            for i in seeded:
                r = rows[i]
                noise[i].exponential_(generator=self._generator(request_ids[r], params[r]))
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    def _penalty_state(self, request_id: str, params: SamplingParams, prompt: list[int],
                       output: list[int], num_outputs: int, vocab: int,
                       device: torch.device) -> _PenaltyState:
        """The request's state, built from its token lists the first time (or again if the
        lists moved on without this sampler, which the engine never does). `num_outputs`:
        the output's length, pending tokens included; the state folded those in when it
        sampled them, and only a state that matches can stand for tokens the lists lack."""
        state = _current_state(self._penalties, request_id, num_outputs, output, "penalty")
        if state is not None:
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

    def _bad_words_state(self, request_id: str, params: SamplingParams, output: list[int],
                         num_outputs: int, device: torch.device) -> _BadWordsState:
        """The request's bad-word state, built from its output the first time (as
        `_penalty_state`: a state that folded in the pending tokens stands for them)."""
        state = _current_state(self._bad_words, request_id, num_outputs, output, "bad-word")
        if state is not None:
            return state
        sequences = [ids for ids in params.bad_words_token_ids if len(ids) > 1]
        width = max(len(ids) for ids in sequences) - 1
        prefixes = [[-1] * (width + 1 - len(ids)) + list(ids[:-1]) for ids in sequences]
        recent = output[-width:]
        state = _BadWordsState(
            torch.tensor(prefixes, dtype=torch.int64, device=device),
            torch.tensor([ids[-1] for ids in sequences], dtype=torch.int64, device=device),
            torch.tensor([-2] * (width - len(recent)) + recent, dtype=torch.int64,
                         device=device),
            len(output))
        self._bad_words[request_id] = state
        return state


def _current_state(states: dict[str, Any], request_id: str, num_outputs: int,
                   output: list[int], what: str) -> Any:
    """The request's state if it has folded in `num_outputs` output tokens; None if it must be
    built from the output list, which then has to hold them all (a state lost while tokens
    were pending cannot be rebuilt)."""
    state = states.get(request_id)
    if state is not None and state.num_output_tokens == num_outputs:
        return state
    if num_outputs != len(output):
        raise RuntimeError(f"request {request_id!r}: {what} state for {num_outputs} output "
                           f"tokens is missing and {len(output)} are known")
    return None


def apply_penalties(logits: torch.Tensor, penalised: list[tuple[int, _PenaltyState]],
                    params: list[SamplingParams]) -> None:
    """The penalised rows of logits, in place, together (vLLM's order and formulas): the
    repetition penalty over the ids in each row's `seen` (prompt or output), then the
    frequency penalty per occurrence and the presence penalty once over its output's
    `counts`; then bounded (see LOGIT_BOUND). A few kernels for the whole batch: row by row
    it was ~8 launches per request, milliseconds a step at batch 256 with a model's default
    repetition penalty. Where every row takes part (the usual batch), nothing is indexed."""
    device = logits.device
    index = _subset([row for row, _ in penalised], logits.shape[0], device)
    rows = logits if index is None else logits[index]
    repeating = [(i, state.seen) for i, (_, state) in enumerate(penalised)
                 if state.seen is not None]
    if repeating:
        at = _subset([i for i, _ in repeating], len(penalised), device)
        seen = torch.stack([mask for _, mask in repeating])
        penalty = _per_row([params[penalised[i][0]].repetition_penalty for i, _ in repeating],
                           device)
        values = rows if at is None else rows[at]
        _assign(rows, at, torch.where(seen, torch.where(values > 0, values / penalty,
                                                        values * penalty), values))
    counting = [(i, state.counts) for i, (_, state) in enumerate(penalised)
                if state.counts is not None]
    if counting:
        at = _subset([i for i, _ in counting], len(penalised), device)
        counts = torch.stack([c for _, c in counting])
        chosen = [params[penalised[i][0]] for i, _ in counting]
        frequency = _per_row([p.frequency_penalty for p in chosen], device)
        presence = _per_row([p.presence_penalty for p in chosen], device)
        values = rows if at is None else rows[at]
        _assign(rows, at, values - (frequency * counts + presence * (counts > 0)))
    rows.nan_to_num_(nan=0.0).clamp_(-LOGIT_BOUND, LOGIT_BOUND)
    if index is not None:
        logits[index] = rows


def _assign(rows: torch.Tensor, at: torch.Tensor | None, values: torch.Tensor) -> None:
    """rows[at] = values, or all of rows where `at` is None (see `_subset`)."""
    if at is None:
        rows.copy_(values)
    else:
        rows[at] = values


def _subset(positions: list[int], total: int, device: torch.device) -> torch.Tensor | None:
    """`positions` (ascending) as an index tensor, or None where they are all of 0..total-1."""
    return None if len(positions) == total else _upload(positions, device)


def _per_row(values: list[float], device: torch.device) -> float | torch.Tensor:
    """A per-row factor: a Python float when every row has the same value (the usual batch:
    no upload), else a (rows, 1) column on the device."""
    first = values[0]
    if all(v == first for v in values):
        return float(first)
    return _upload(values, device, torch.float32)[:, None]
