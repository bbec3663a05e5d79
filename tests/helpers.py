"""Shared test helpers: run our model on plain sequences without an engine; steps of
attention around one sequence, for the batch-invariance checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.attention.base import AttentionBackend, AttentionMetadata
from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.model.llama import LlamaForCausalLM
from kvtier.runner.model_runner import ModelRunner
from kvtier.types import SamplingParams, ScheduledRequest, SchedulerOutput


def full_logits(model: LlamaForCausalLM, token_ids: list[int], block_size: int = 16,
                chunk: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Logits at every position of one sequence, through the paged path, in prefill chunks."""
    num_blocks = len(token_ids) // block_size + 2
    runner = ModelRunner(model, model.layers[0].self_attn.backend, num_blocks, block_size,
                         device or torch.device("cpu"), next(model.parameters()).dtype, seed=0)
    block_ids = list(range(num_blocks))
    chunk = chunk or len(token_ids)
    rows = []
    for start in range(0, len(token_ids), chunk):
        piece = token_ids[start:start + chunk]
        step = SchedulerOutput([ScheduledRequest("r", piece, start, block_ids, True,
                                                 SamplingParams(), 0)], len(piece))
        input_ids, positions, metadata = runner._prepare_inputs(step)
        with torch.inference_mode():
            hidden = model(input_ids, positions, runner.kv_caches, metadata)
            rows.append(model.compute_logits(hidden))
    return torch.cat(rows)


def new_backend() -> TorchAttentionBackend:
    return TorchAttentionBackend()


@dataclass(frozen=True)
class Chunk:
    """One sequence of a step: `prefix` tokens cached, `query_len` new ones. The sequence
    under test (`shared`) takes its q/k/v rows from the same per-position tensors in every
    step; the others are random."""

    prefix: int
    query_len: int
    shared: bool = False


class Sequences:
    """Per-position q, k, v of the sequence under test, and steps built around it."""

    def __init__(self, length: int, shape: tuple[int, int, int], block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = shape
        self.block_size, self.dtype, self.device = block_size, dtype, device
        gen = torch.Generator().manual_seed(3)
        self.q = torch.randn(length, self.num_heads, self.head_dim, generator=gen).to(dtype)
        self.k = torch.randn(length, self.num_kv_heads, self.head_dim, generator=gen).to(dtype)
        self.v = torch.randn(length, self.num_kv_heads, self.head_dim, generator=gen).to(dtype)
        self.gen = gen

    def run(self, backend: AttentionBackend, chunks: list[Chunk], num_decodes: int,
            extra_table_columns: int = 0, context_hint: int | None = None) -> torch.Tensor:
        """The backend's output rows of the shared sequence's chunk, (query_len, H, D).
        As a CUDA graph's step (`cuda_graph.DecodeGraphs`): extra_table_columns widen the
        block table past the longest sequence, and `prepare` sees context_hint as every
        sequence's length (a horizon, not the lengths)."""
        bs, kvh, d = self.block_size, self.num_kv_heads, self.head_dim
        blocks = [-(-(c.prefix + c.query_len) // bs) for c in chunks]
        order = (torch.randperm(sum(blocks) + 1, generator=self.gen) + 1).tolist()
        cache = torch.randn(2, sum(blocks) + 2, bs, kvh, d, generator=self.gen).to(self.dtype)
        flat = cache.view(2, -1, kvh, d)
        queries, keys, values, starts, tables, slots, shared_rows = [], [], [], [0], [], [], None
        for chunk, n in zip(chunks, blocks, strict=True):
            table = [order.pop() for _ in range(n)]
            new = range(chunk.prefix, chunk.prefix + chunk.query_len)
            seq_slots = [table[p // bs] * bs + p % bs for p in range(new.stop)]
            if chunk.shared:
                flat[0, seq_slots[:chunk.prefix]] = self.k[:chunk.prefix]
                flat[1, seq_slots[:chunk.prefix]] = self.v[:chunk.prefix]
                q, k, v = (t[new.start:new.stop] for t in (self.q, self.k, self.v))
                shared_rows = slice(starts[-1], starts[-1] + chunk.query_len)
            else:
                q = torch.randn(chunk.query_len, self.num_heads, d, generator=self.gen)
                k, v = (torch.randn(chunk.query_len, kvh, d, generator=self.gen)
                        for _ in range(2))
            queries.append(q)
            keys.append(k)
            values.append(v)
            slots += seq_slots[chunk.prefix:]
            tables.append(table)
            starts.append(starts[-1] + chunk.query_len)
        width = max(blocks) + extra_table_columns
        seq_lens = [c.prefix + c.query_len for c in chunks]
        seen_lens = seq_lens if context_hint is None else [context_hint] * len(chunks)
        dev = self.device
        metadata = AttentionMetadata(
            num_tokens=starts[-1], num_seqs=len(chunks), num_decodes=num_decodes,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                     dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc_cpu=starts, seq_lens_cpu=seen_lens,
            max_query_len=max(c.query_len for c in chunks), max_seq_len=max(seen_lens),
            block_size=bs)
        backend.prepare(metadata)
        to = dict(dtype=self.dtype, device=dev)
        out = backend.forward(torch.cat(queries).to(**to), torch.cat(keys).to(**to),
                              torch.cat(values).to(**to), cache.to(dev), metadata,
                              self.head_dim ** -0.5)
        assert shared_rows is not None
        return out[shared_rows].cpu()


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    differ = got != expected
    rows = differ.flatten(1).any(1).nonzero().flatten().tolist()
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} values differ, "
                              f"in rows {rows[:8]}, by up to "
                              f"{(got.double() - expected.double()).abs().max():.3g}")

def check_rows_are_batch_invariant(make_backend: Callable[[], AttentionBackend],
                                   seqs: Sequences, prefix: int, tolerance: float) -> None:
    """The shared sequence's tokens attended as a whole prompt alone, as an extend after a
    cached prefix beside a decode and another prefill, in two chunks, and (the last one) as
    a decode beside other decodes: the same bits for every row, and close to the causal
    softmax of float64, per query head."""
    length = len(seqs.q)
    whole = seqs.run(make_backend(), [Chunk(0, length, shared=True)], num_decodes=0)
    extend = seqs.run(make_backend(), [Chunk(40, 1), Chunk(prefix, length - prefix, shared=True),
                                       Chunk(20, 30)], num_decodes=1)
    first = seqs.run(make_backend(), [Chunk(0, prefix, shared=True), Chunk(5, 60)],
                     num_decodes=0)
    last = seqs.run(make_backend(), [Chunk(90, 1), Chunk(length - 1, 1, shared=True),
                                     Chunk(3, 1)], num_decodes=3)
    assert_same_bits(extend, whole[prefix:], "extend after a cached prefix")
    assert_same_bits(first, whole[:prefix], "first chunk beside another prefill")
    assert_same_bits(last, whole[length - 1:], "last token as a decode")
    group = seqs.num_heads // seqs.num_kv_heads
    k = seqs.k.double().repeat_interleave(group, dim=1)
    v = seqs.v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", seqs.q.double(), k) * seqs.head_dim ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf"))
                            .softmax(-1), v)
    torch.testing.assert_close(whole.double(), expected, atol=tolerance, rtol=tolerance)
