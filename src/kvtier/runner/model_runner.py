"""Runs one scheduler step on the device: flatten the batch, forward, sample.

Owns the paged KV cache tensor, laid out (num_layers, 2, num_blocks + 1, block_size, kv_heads,
head_dim) so that one block of every layer can be gathered with a single index for tier copies.
The extra last block is scratch space that no request owns (CUDA-graph padding writes there).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.attention.base import AttentionBackend, AttentionMetadata
from kvtier.model.llama import LlamaForCausalLM
from kvtier.runner.cuda_graph import DecodeGraphs
from kvtier.runner.logprobs import PromptLogprobs, StepLogprobs, prompt_logprobs, step_logprobs
from kvtier.runner.piecewise_graph import PiecewiseGraphs
from kvtier.runner.sampler import Sampler
from kvtier.types import PENDING_TOKEN_ID, ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from kvtier.utils.device import pinned_copy, upload, upload_ids


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, num_blocks: int,
                 block_size: int, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        spec = model.spec
        self.model = model
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Zero-filled: padded gathers read unused slots, which must hold finite values.
        self.kv_cache = torch.zeros(spec.num_hidden_layers, 2, num_blocks + 1, block_size,
                                    spec.num_key_value_heads, spec.head_dim, dtype=dtype,
                                    device=device)
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.scratch_block = num_blocks
        self.sampler = Sampler(device, seed)
        self.graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None
        self._last_sampled: _SampledTokens | None = None
        """The last launched step's sampled tokens: the inputs of the next step's pending
        decodes (async scheduling)."""

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Capture CUDA graphs for decode batches up to `max_batch` (CUDA backends only)."""
        max_blocks = -(-max_model_len // self.block_size)
        graphs = DecodeGraphs(self.model, self.backend, self.kv_caches, self.scratch_block,
                              max_batch, max_blocks, self.block_size)
        graphs.capture()
        self.graphs = graphs

    def capture_piecewise_graphs(self, max_tokens: int) -> None:
        """Capture the model around attention for steps of up to max_tokens (CUDA only)."""
        graphs = PiecewiseGraphs(self.model, self.kv_caches, max_tokens)
        graphs.capture()
        self.piecewise = graphs

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """Run the step and wait for its sampled tokens."""
        return self.launch(step).result()

    def launch(self, step: SchedulerOutput) -> PendingOutput:
        """Queue the step's kernels (on CUDA the host returns before the device finishes);
        `result()` of the returned handle waits for the sampled tokens."""
        # Preempted requests keep their seeded generators: resumed, they go on sampling the
        # same stream, so a seed gives the same tokens whatever the KV pressure.
        self.sampler.forget(step.finished_request_ids)
        previous, self._last_sampled = self._last_sampled, None
        if not step.requests:
            return PendingOutput([], None)
        pending = _pending_inputs(step.requests, previous)
        if self._can_replay(step):
            return self._execute_graph(step, pending)
        padded = (self.piecewise.size_for(step.num_scheduled_tokens)
                  if self.piecewise is not None else None)
        input_ids, positions, metadata = self._prepare_inputs(step, padded)
        if pending is not None:
            pending.write_into(input_ids)
        sampling = [(i, s) for i, s in enumerate(step.requests) if s.sample]
        with torch.inference_mode():
            if padded is not None:
                assert self.piecewise is not None
                hidden = self.piecewise.run(input_ids, positions, metadata)
            else:
                hidden = self.model(input_ids, positions, self.kv_caches, metadata)
            prompt = prompt_logprobs(self.model.compute_logits, hidden,
                                     metadata.query_start_loc_cpu, step.requests)
            if not sampling:
                return PendingOutput([], None, prompt_logprobs=prompt)
            last_rows = upload_ids([metadata.query_start_loc_cpu[i + 1] - 1 for i, _ in sampling],
                                   self.device)
            logits = self.model.compute_logits(hidden[last_rows])
            return self._sample(logits, [s for _, s in sampling], prompt)

    def _can_replay(self, step: SchedulerOutput) -> bool:
        return self.graphs is not None and all(
            len(s.token_ids) == 1 and s.sample and not s.prompt_logprob_targets
            for s in step.requests) and self.graphs.fits(
            len(step.requests), max(len(s.block_ids) for s in step.requests))

    def _execute_graph(self, step: SchedulerOutput,
                       pending: PendingInputs | None) -> PendingOutput:
        assert self.graphs is not None
        bs = self.block_size
        positions = [s.num_computed_tokens for s in step.requests]
        logits = self.graphs.run(
            token_ids=[s.token_ids[0] for s in step.requests],
            positions=positions,
            slots=[s.block_ids[p // bs] * bs + p % bs for s, p in zip(step.requests, positions,
                                                                   strict=True)],
            block_tables=[s.block_ids for s in step.requests],
            seq_lens=[p + 1 for p in positions],
            pending=pending)
        return self._sample(logits, step.requests)

    @torch.inference_mode()
    def _sample(self, logits: torch.Tensor, requests: list[ScheduledRequest],
                prompt: PromptLogprobs | None = None) -> PendingOutput:
        """One token per row of logits (request i's last position), and the logprobs of the
        requests that ask for them; `prompt`: the step's prompt logprobs, to copy with them."""
        ids = [s.request_id for s in requests]
        params = [s.sampling_params for s in requests]
        logprobs = step_logprobs(logits, params)  # raw: before the sampler's in-place changes
        tokens = self.sampler.sample_async(logits, ids, params,
                                           [s.penalty_context for s in requests],
                                           [s.suppressed_token_ids for s in requests],
                                           [s.num_output_tokens for s in requests])
        if logprobs is not None:
            logprobs.attach(tokens)
        self._last_sampled = _SampledTokens(ids, tokens)
        return PendingOutput(ids, tokens, logprobs, prompt)

    def _prepare_inputs(self, step: SchedulerOutput, padded_tokens: int | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flattened inputs, padded to padded_tokens rows if given (token 0 at position 0,
        slot -1). Built in numpy arrays: for an 8,192-token prompt Python lists cost ~8 ms of
        host time before the first kernel (the device idles), numpy ~1 ms (this repo's CPU)."""
        bs = self.block_size
        requests = step.requests
        num_decodes = 0
        for s in requests:
            if len(s.token_ids) != 1:
                break
            num_decodes += 1
        query_lens = [len(s.token_ids) for s in requests]
        query_start_loc = [0, *itertools.accumulate(query_lens)]
        num_tokens = query_start_loc[-1]
        rows = padded_tokens or num_tokens
        token_ids = np.zeros(rows, dtype=np.int64)
        positions = np.zeros(rows, dtype=np.int64)
        slots = np.full(rows, -1, dtype=np.int64)
        max_blocks = max(len(s.block_ids) for s in requests)
        block_table = np.zeros((len(requests), max_blocks), dtype=np.int32)
        for i, s in enumerate(requests):
            block_table[i, :len(s.block_ids)] = s.block_ids
        seq_lens = [s.num_computed_tokens + n for s, n in zip(requests, query_lens, strict=True)]
        if num_decodes:  # one token each: per-request numpy calls would cost more than lists
            decodes = requests[:num_decodes]
            decode_positions = [s.num_computed_tokens for s in decodes]
            token_ids[:num_decodes] = [s.token_ids[0] for s in decodes]
            positions[:num_decodes] = decode_positions
            slots[:num_decodes] = [s.block_ids[p // bs] * bs + p % bs
                                   for s, p in zip(decodes, decode_positions, strict=True)]
        for i in range(num_decodes, len(requests)):
            s = requests[i]
            first, last = query_start_loc[i], query_start_loc[i + 1]
            span = np.arange(s.num_computed_tokens, seq_lens[i], dtype=np.int64)
            token_ids[first:last] = s.token_ids
            positions[first:last] = span
            slots[first:last] = block_table[i, span // bs] * bs + span % bs
        device = self.device
        metadata = AttentionMetadata(
            num_tokens=num_tokens,
            num_seqs=len(requests),
            num_decodes=num_decodes,
            query_start_loc=upload_ids(query_start_loc, device, torch.int32),
            seq_lens=upload_ids(seq_lens, device, torch.int32),
            block_table=upload(torch.from_numpy(block_table), device),
            slot_mapping=upload(torch.from_numpy(slots), device),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=bs,
            seq_ids=[s.request_id for s in requests],
        )
        self.backend.prepare(metadata)
        return (upload(torch.from_numpy(token_ids), device),
                upload(torch.from_numpy(positions), device), metadata)


@dataclass(frozen=True)
class _SampledTokens:
    request_ids: list[str]
    """Row i of `tokens` is request_ids[i]'s."""
    tokens: torch.Tensor
    """(rows,) int64 on the device, as the sampler returned them."""


@dataclass(frozen=True)
class PendingInputs:
    """Decode rows whose input is the token the previous launched step samples (async
    scheduling): written into the step's input ids on the device, without the host."""

    rows: list[int]
    """Rows of this step's input ids."""
    sources: list[int]
    """Their rows of the previous step's sampled tokens."""
    sampled: torch.Tensor

    def write_into(self, input_ids: torch.Tensor) -> None:
        n = len(self.rows)
        if self.rows == self.sources and self.rows[-1] == n - 1:  # rows 0..n-1: a slice
            input_ids[:n].copy_(self.sampled[:n])
            return
        index = upload_ids(self.rows + self.sources, input_ids.device).view(2, n)
        input_ids.index_copy_(0, index[0], self.sampled.index_select(0, index[1]))


def _pending_inputs(requests: list[ScheduledRequest],
                    previous: _SampledTokens | None) -> PendingInputs | None:
    """The step's pending decodes (always single-token queries, so decode rows first). The
    previous step's rows are looked up only when there are any (never without async
    scheduling)."""
    rows: list[int] = []
    sources: list[int] = []
    previous_rows: dict[str, int] | None = None
    for row, s in enumerate(requests):
        if s.token_ids[0] != PENDING_TOKEN_ID:
            continue
        if previous_rows is None:
            previous_rows = ({} if previous is None else
                             {request_id: i for i, request_id in enumerate(previous.request_ids)})
        source = previous_rows.get(s.request_id)
        if source is None or len(s.token_ids) != 1:
            raise RuntimeError(f"request {s.request_id!r}: its input token is pending, but "
                               "the previous step did not sample it")
        rows.append(row)
        sources.append(source)
    if not rows:
        return None
    assert previous is not None
    return PendingInputs(rows, sources, previous.tokens)


class PendingOutput:
    """A launched step's sampled tokens, still on the device until `result()`."""

    def __init__(self, request_ids: list[str], tokens: torch.Tensor | None,
                 logprobs: StepLogprobs | None = None,
                 prompt_logprobs: PromptLogprobs | None = None) -> None:
        self.request_ids = request_ids
        self.tokens = tokens
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self._copied: torch.cuda.Event | None = None
        if (tokens is not None and tokens.is_cuda) or (
                prompt_logprobs is not None and prompt_logprobs.scores.values.is_cuda):
            # Copy now, so that `result()` waits for the tokens only, not for work enqueued
            # after them (the next step's tier stores gather blocks on the same stream).
            if tokens is not None:
                self.tokens = pinned_copy(tokens)
            if logprobs is not None:
                logprobs.to_host_async()
            if prompt_logprobs is not None:
                prompt_logprobs.to_host_async()
            self._copied = torch.cuda.Event()
            self._copied.record()

    def result(self) -> ModelRunnerOutput:
        """Wait for the tokens (the step's one host synchronisation)."""
        if self._copied is not None:
            self._copied.synchronize()
        prompt = self.prompt_logprobs.per_request() if self.prompt_logprobs is not None else {}
        if self.tokens is None:
            return ModelRunnerOutput({}, prompt_logprobs=prompt)
        tokens = self.tokens.tolist()
        sampled = dict(zip(self.request_ids, tokens, strict=True))
        logprobs = ({self.request_ids[row]: entry for row, entry
                     in self.logprobs.per_row(tokens).items()}
                    if self.logprobs is not None else {})
        return ModelRunnerOutput(sampled, logprobs, prompt)
