"""Reference paged attention in plain torch: runs on CPU and CUDA; the oracle for fast backends.

Context K/V are gathered block-wise (one index per block, not per token) from the paged cache.
Decodes are batched into one grouped-query matmul per layer under a padding mask (a single query
per sequence makes SDPA's kernels pay more in setup than in math); prefill chunks go through
SDPA one sequence at a time, against their cached prefix plus the chunk itself.

With `contiguous_decode` (the default on the CPU) decodes attend out of a `DecodeMirror` that
keeps the running decodes' K/V contiguous across steps instead of gathering them every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier.attention.base import AttentionBackend, AttentionMetadata
from kvtier.attention.decode_mirror import DecodeMirror, MirrorStep, attend


@dataclass
class _PrefillSeq:
    start: int
    end: int
    seq_len: int
    block_ids: torch.Tensor | None
    """(num_blocks,) blocks of the whole context, or None when the chunk is the whole context."""
    mask: torch.Tensor | None
    """(query_len, seq_len) bool, True = may attend; None = plain causal."""


@dataclass
class _StepData:
    decode_blocks: torch.Tensor | None
    """(num_decodes, max_blocks) int64 block ids, padded."""
    decode_mask: torch.Tensor | None
    """(num_decodes, 1, 1, max_blocks * block_size) bool, True = real token."""
    prefills: list[_PrefillSeq]
    mirror: MirrorStep | None = None


def gather_context(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """(2, num_blocks, bs, H, D) cache, (..., n) block ids -> (2, ..., n * bs, H, D)."""
    kv = kv_cache[:, block_ids]
    shape = kv.shape
    return kv.reshape(*shape[:-4], shape[-4] * shape[-3], *shape[-2:])


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, contiguous_decode: bool = False) -> None:
        self._mirror = DecodeMirror() if contiguous_decode else None

    def prepare(self, metadata: AttentionMetadata) -> None:
        nd, bs = metadata.num_decodes, metadata.block_size
        device = metadata.block_table.device
        decode_blocks = decode_mask = mirror = None
        if self._mirror is not None:
            if nd and metadata.seq_ids is not None:
                mirror = self._mirror.plan(metadata.seq_ids[:nd], metadata.seq_lens_cpu[:nd],
                                           device)
            else:
                self._mirror.forget_rows()
        if nd and mirror is None:
            max_blocks = -(-max(metadata.seq_lens_cpu[:nd]) // bs)
            decode_blocks = metadata.block_table[:nd, :max_blocks].to(torch.int64)
            positions = torch.arange(max_blocks * bs, device=device)
            decode_mask = (positions[None, :] < metadata.seq_lens[:nd, None])[:, None, None, :]
        prefills = []
        for i in range(nd, metadata.num_seqs):
            start, end = metadata.query_start_loc_cpu[i], metadata.query_start_loc_cpu[i + 1]
            seq_len, query_len = metadata.seq_lens_cpu[i], end - start
            blocks = mask = None
            if seq_len != query_len:
                blocks = metadata.block_table[i, :-(-seq_len // bs)].to(torch.int64)
                key_pos = torch.arange(seq_len, device=device)
                query_pos = torch.arange(seq_len - query_len, seq_len, device=device)
                mask = key_pos[None, :] <= query_pos[:, None]
            prefills.append(_PrefillSeq(start, end, seq_len, blocks, mask))
        metadata.backend_data = _StepData(decode_blocks, decode_mask, prefills, mirror)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None, kv_written: bool = False) -> torch.Tensor:
        del kv_written  # not `accepts_written_kv`: the model never sets it here
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        if self._mirror is not None and not self._mirror.pool_tokens:
            self._mirror.pool_tokens = kv_cache.shape[1] * kv_cache.shape[2]
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, key)
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, value)
        data: _StepData = metadata.backend_data
        if out is None:
            out = torch.empty_like(query)
        nd = metadata.num_decodes
        if data.mirror is not None:
            assert self._mirror is not None
            mirror_kv = self._mirror.update(data.mirror, kv_cache, key, value,
                                            metadata.block_table)
            out[:nd] = attend(query[:nd], mirror_kv, data.mirror, scale)
        elif nd:
            out[:nd] = _decode(query[:nd], kv_cache, data, scale)
        for seq in data.prefills:
            q = query[seq.start:seq.end].transpose(0, 1)
            if seq.block_ids is None:
                k = key[seq.start:seq.end].transpose(0, 1)
                v = value[seq.start:seq.end].transpose(0, 1)
            else:
                kv = gather_context(kv_cache, seq.block_ids)[:, :seq.seq_len]
                k, v = kv[0].transpose(0, 1), kv[1].transpose(0, 1)
            # 4-D inputs: with 3-D ones SDPA's CPU dispatch takes its math fallback (K/V
            # expanded per query head, mask preprocessing), 4-7x slower than its flash kernel.
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=seq.mask,
                                               scale=scale, is_causal=seq.mask is None,
                                               enable_gqa=True)
            out[seq.start:seq.end] = o[0].transpose(0, 1)
        return out


def _decode(query: torch.Tensor, kv_cache: torch.Tensor, data: _StepData,
            scale: float) -> torch.Tensor:
    """One query per sequence: (n, H, D) -> (n, H, D), grouped by KV head without copying K/V
    per query head."""
    assert data.decode_blocks is not None and data.decode_mask is not None
    n, num_heads, head_dim = query.shape
    kv = gather_context(kv_cache, data.decode_blocks)  # (2, n, L, KVH, D), a copy
    # The slots past each sequence's length hold whatever their blocks held (another
    # sequence's K/V, start-up scratch): masked scores give them probability 0, but 0 * NaN
    # is NaN, so their values are zeroed in the gathered copy.
    kv[1].masked_fill_(~data.decode_mask.view(n, -1, 1, 1), 0)
    num_kv_heads = kv.shape[-2]
    q = query.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    k = kv[0].permute(0, 2, 3, 1)  # (n, KVH, D, L)
    v = kv[1].transpose(1, 2)  # (n, KVH, L, D)
    scores = torch.matmul(q, k).float() * scale  # (n, KVH, G, L)
    scores.masked_fill_(~data.decode_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(n, num_heads, head_dim)
