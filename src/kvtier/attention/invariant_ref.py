"""Batch-invariant paged attention in plain torch: `--batch-invariant` on the CPU.

A query token's output here is the same bits whatever step it runs in (whole prompt, extend
after a cached prefix, decode, beside any other requests), as `TritonAttentionBackend` gives
on CUDA with `batch_invariant`. The torch backend does not: its decodes and its prompts run
through different kernels (SDPA, a masked matmul over the batch's longest context), and a
token's bits follow whichever ran it (`tests/unit/attention/test_invariant_ref.py`).

Every sequence's rows (its query tokens x the query heads of one KV head) attend in one loop
over key tiles of KEY_TILE keys aligned at key 0, with an online softmax:

- the two matmuls per tile are (rows, D) x (D, KEY_TILE) and (rows, KEY_TILE) x (KEY_TILE, D),
  rows padded to a multiple of ROW_QUANTUM, so BLAS computes every row with one kernel
  whatever the batch (see ROW_QUANTUM);
- exp and the tile sums run in float64 and are rounded once to float32: torch's vectorised
  exp and its scalar tail differ in the last bit, and which elements land in a tail depends
  on the tensor's size; in float64 a difference survives the rounding practically never;
- tiles past a row's position are fully masked and leave its sums unchanged, so extra tiles
  that other rows of the batch need cost no bits.

Decodes of a step run batched (one tile loop for DECODES_PER_GROUP of them), prefill chunks
one sequence at a time.
Slower than the torch backend: it is for reproducibility, not speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.attention.base import AttentionBackend, AttentionMetadata

KEY_TILE = 64
ROW_QUANTUM = 8
"""The attention tiles' GEMM rows are padded to a multiple of this. MKL rounds a GEMM with
fewer than 8 rows differently (1-3 rows, and rows 4-6 of 7); at every multiple of 8 each row
had the same bits for these tiles' shapes on every box so far
(`tests/unit/attention/test_invariant_ref.py` checks it wherever the suite runs). The
projections need calls of one fixed shape instead (`layers.ROWS_PER_CALL`)."""
DECODES_PER_GROUP = 16
"""Decodes attended together: each group's contexts are copied into one padded float32
buffer per layer, so the group size bounds that buffer (16 x 4,096 tokens of SmolLM2's K/V:
50 MB each for K and V). Which group a decode lands in changes none of its bits."""


@dataclass
class _Group:
    """Sequences attended together: their query rows and contexts."""

    rows: torch.Tensor
    """(n,) indices into the step's tokens, one per sequence token, in order."""
    positions: list[torch.Tensor]
    """Per sequence, the positions of its query tokens."""
    blocks: list[torch.Tensor]
    """Per sequence, the block ids of its whole context."""
    seq_lens: list[int]


class InvariantTorchAttentionBackend(AttentionBackend):
    name = "torch-invariant"

    def prepare(self, metadata: AttentionMetadata) -> None:
        bs, starts = metadata.block_size, metadata.query_start_loc_cpu
        device = metadata.block_table.device
        groups = []
        nd = metadata.num_decodes
        seqs = [range(i, min(i + DECODES_PER_GROUP, nd))
                for i in range(0, nd, DECODES_PER_GROUP)]
        seqs += [range(i, i + 1) for i in range(nd, metadata.num_seqs)]
        for members in seqs:
            rows, positions, blocks, lens = [], [], [], []
            for i in members:
                seq_len, query_len = metadata.seq_lens_cpu[i], starts[i + 1] - starts[i]
                rows.append(torch.arange(starts[i], starts[i + 1]))
                positions.append(torch.arange(seq_len - query_len, seq_len, device=device))
                blocks.append(metadata.block_table[i, :-(-seq_len // bs)].to(torch.int64))
                lens.append(seq_len)
            groups.append(_Group(torch.cat(rows).to(device), positions, blocks, lens))
        metadata.backend_data = groups

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None, kv_written: bool = False) -> torch.Tensor:
        del kv_written  # not `accepts_written_kv`
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, key)
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, value)
        if out is None:
            out = torch.empty_like(query)
        for group in metadata.backend_data:
            out[group.rows] = _attend_group(query, kv_cache, group, scale).to(out.dtype)
        return out


def _attend_group(query: torch.Tensor, kv_cache: torch.Tensor, group: _Group,
                  scale: float) -> torch.Tensor:
    """Outputs (n, H, D) of the group's query rows, in `group.rows` order."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    per_kv = num_heads // num_kv_heads
    bs = kv_cache.shape[2]
    longest = max(group.seq_lens)
    width = -(-longest // KEY_TILE) * KEY_TILE
    # Rows of one (sequence, KV head): its tokens x the KV head's query heads, padded.
    tokens = max(len(p) for p in group.positions)
    rows = -(-tokens * per_kv // ROW_QUANTUM) * ROW_QUANTUM
    num = len(group.seq_lens)
    q = query.new_zeros((num, num_kv_heads, rows, head_dim), dtype=torch.float32)
    q_pos = torch.full((num, num_kv_heads, rows), -1, dtype=torch.int64, device=query.device)
    k = query.new_zeros((num, num_kv_heads, width, head_dim), dtype=torch.float32)
    v = torch.zeros_like(k)
    start = 0
    for s, (positions, blocks, seq_len) in enumerate(zip(group.positions, group.blocks,
                                                          group.seq_lens, strict=True)):
        n = len(positions)
        own = query[group.rows[start:start + n]].float()  # (n, H, D)
        start += n
        # Row t * per_kv + g: token t, query head kv_head * per_kv + g.
        q[s, :, :n * per_kv] = own.view(n, num_kv_heads, per_kv, head_dim).transpose(0, 1) \
            .reshape(num_kv_heads, n * per_kv, head_dim)
        q_pos[s, :, :n * per_kv] = positions.repeat_interleave(per_kv)
        context = kv_cache[:, blocks].reshape(2, len(blocks) * bs, num_kv_heads, head_dim)
        k[s, :, :seq_len] = context[0, :seq_len].transpose(0, 1).float()
        v[s, :, :seq_len] = context[1, :seq_len].transpose(0, 1).float()
    out = _online_softmax(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                          q_pos.flatten(0, 1), scale, longest)
    out = out.view(num, num_kv_heads, rows, head_dim)
    pieces = [out[s, :, :len(p) * per_kv].reshape(num_kv_heads, len(p), per_kv, head_dim)
              .transpose(0, 1).reshape(len(p), num_heads, head_dim)
              for s, p in enumerate(group.positions)]
    return torch.cat(pieces)


def _online_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    scale: float, num_keys: int) -> torch.Tensor:
    """(B, R, D) float32 outputs of rows q (B, R, D) over keys k, v (B, W, D), row r of batch b
    seeing keys <= q_pos[b, r] (-1: a padding row, output 0), KEY_TILE keys at a time."""
    batch, rows, head_dim = q.shape
    m = torch.full((batch, rows), float("-inf"), device=q.device)
    total = torch.zeros((batch, rows), device=q.device)
    acc = torch.zeros((batch, rows, head_dim), device=q.device)
    for first in range(0, num_keys, KEY_TILE):
        keys = torch.arange(first, first + KEY_TILE, device=q.device)
        scores = torch.bmm(q, k[:, first:first + KEY_TILE].transpose(1, 2)) * scale
        scores = scores.masked_fill(keys[None, None, :] > q_pos[:, :, None], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))
        m_sub = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp((scores - m_sub[..., None]).double())
        alpha = torch.exp((m - m_sub).double()).float()
        total = total * alpha + p.sum(-1).float()
        acc = acc * alpha[..., None] + torch.bmm(p.float(), v[:, first:first + KEY_TILE])
        m = m_new
    return acc / torch.where(total > 0, total, 1.0)[..., None]
