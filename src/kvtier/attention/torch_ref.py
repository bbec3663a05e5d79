"""Reference paged attention in plain torch: runs on CPU and CUDA; the oracle for fast backends.

Decodes are batched: their context slots are gathered into one padded (batch, max_len) index
and attended with a single SDPA call under a padding mask. Prefill chunks are attended one
sequence at a time, against their cached prefix (gathered) plus the chunk itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class _PrefillSeq:
    start: int
    end: int
    context_slots: torch.Tensor | None
    """(seq_len,) slots of the whole context, or None when the chunk is the whole context."""
    mask: torch.Tensor | None
    """(query_len, seq_len) bool, True = may attend; None = plain causal."""


@dataclass
class _StepData:
    decode_slots: torch.Tensor | None
    """(num_decodes, max_len) int64 slots, padded."""
    decode_mask: torch.Tensor | None
    """(num_decodes, 1, 1, max_len) bool, True = real token."""
    prefills: list[_PrefillSeq]


def context_slots(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                  max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of positions 0..max_len-1 for each sequence, and the mask of real positions."""
    positions = torch.arange(max_len, device=block_table.device)
    blocks = block_table[:, positions // block_size].to(torch.int64)
    slots = blocks * block_size + positions % block_size
    return slots, positions[None, :] < seq_lens[:, None]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def prepare(self, metadata: AttentionMetadata) -> None:
        nd = metadata.num_decodes
        decode_slots = decode_mask = None
        if nd:
            max_len = max(metadata.seq_lens_cpu[:nd])
            decode_slots, mask = context_slots(metadata.block_table[:nd], metadata.seq_lens[:nd],
                                               metadata.block_size, max_len)
            decode_mask = mask[:, None, None, :]
        prefills = []
        for i in range(nd, metadata.num_seqs):
            start, end = metadata.query_start_loc_cpu[i], metadata.query_start_loc_cpu[i + 1]
            seq_len, query_len = metadata.seq_lens_cpu[i], end - start
            slots = mask = None
            if seq_len != query_len:
                slots, _ = context_slots(metadata.block_table[i:i + 1],
                                         metadata.seq_lens[i:i + 1], metadata.block_size, seq_len)
                slots = slots[0]
                device = metadata.block_table.device
                key_pos = torch.arange(seq_len, device=device)
                query_pos = torch.arange(seq_len - query_len, seq_len, device=device)
                mask = key_pos[None, :] <= query_pos[:, None]
            prefills.append(_PrefillSeq(start, end, slots, mask))
        metadata.backend_data = _StepData(decode_slots, decode_mask, prefills)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)
        value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
        key_cache.index_copy_(0, metadata.slot_mapping, key)
        value_cache.index_copy_(0, metadata.slot_mapping, value)
        data: _StepData = metadata.backend_data
        out = torch.empty_like(query)
        nd = metadata.num_decodes
        if nd:
            assert data.decode_slots is not None
            k = key_cache[data.decode_slots].transpose(1, 2)  # (nd, kv_heads, max_len, dim)
            v = value_cache[data.decode_slots].transpose(1, 2)
            q = query[:nd].unsqueeze(2)  # (nd, heads, 1, dim)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=data.decode_mask, scale=scale,
                                               enable_gqa=True)
            out[:nd] = o.squeeze(2)
        for seq in data.prefills:
            q = query[seq.start:seq.end].transpose(0, 1)
            if seq.context_slots is None:
                k = key[seq.start:seq.end].transpose(0, 1)
                v = value[seq.start:seq.end].transpose(0, 1)
            else:
                k = key_cache[seq.context_slots].transpose(0, 1)
                v = value_cache[seq.context_slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seq.mask, scale=scale,
                                               is_causal=seq.mask is None, enable_gqa=True)
            out[seq.start:seq.end] = o.transpose(0, 1)
        return out
