"""The attention-backend interface: everything device-specific about attention sits behind it.

The runner builds one `AttentionMetadata` per step for the flattened batch; the backend turns it
into whatever it needs (`prepare`, once per step) and then, per layer, writes the step's new K/V
into the paged cache and attends (`forward`).

Flattened batch layout (decodes first, then prefill chunks):

    tokens         | d0 | d1 | d2 |  p0 p0 p0 p0 p0 |  p1 p1 p1 |
    query_start_loc  0    1    2    3               8           11
    seq_lens         = context length of each sequence after this step (cached + new tokens)

KV cache of one layer: a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = K, 1 = V); token t of a sequence is in slot block_table[t // bs] * bs + t % bs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int
    num_seqs: int
    num_decodes: int
    """The first num_decodes sequences have exactly one query token each."""
    query_start_loc: torch.Tensor
    """(num_seqs + 1,) int32 on device: start of each sequence's queries in the batch."""
    seq_lens: torch.Tensor
    """(num_seqs,) int32 on device: context length after this step."""
    block_table: torch.Tensor
    """(num_seqs, max_blocks_per_seq) int32 on device, padded with 0."""
    slot_mapping: torch.Tensor
    """(num_tokens,) int64 on device: cache slot that each new token's K/V is written to."""
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int
    seq_ids: list[str] | None = None
    """Request id of each sequence, when the caller has them: lets a backend keep per-sequence
    state across consecutive steps."""
    backend_data: Any = None
    """Whatever the backend's `prepare` derived for this step."""


class AttentionBackend(ABC):
    """Paged attention for one engine; stateless across steps except for caches it owns."""

    name: str = "base"
    supports_cuda_graphs: bool = False
    """Decode-only steps can be captured: `forward` reads only metadata tensors, and `prepare`
    for a decode-only batch depends only on its shape and `max_seq_len` (an upper bound)."""
    accepts_written_kv: bool = False
    """`forward(..., kv_written=True)` skips the KV write: the model already stored the step's
    keys and values in kv_cache at slot_mapping (fused into its qkv projection)."""

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store key/value (T, KVH, D) at slot_mapping (T,) (a negative slot skips its row),
        as `forward` would: a backend that `accepts_written_kv` lets callers do it apart, e.g.
        inside a CUDA graph, then call `forward(..., kv_written=True)`."""
        raise NotImplementedError(f"the {self.name} backend writes K/V only in forward")

    @abstractmethod
    def prepare(self, metadata: AttentionMetadata) -> None:
        """Derive per-step data (stored in `metadata.backend_data`); called once per step."""

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None, kv_written: bool = False) -> torch.Tensor:
        """Write key/value into kv_cache at metadata.slot_mapping (unless kv_written, for a
        backend that `accepts_written_kv`), then attend causally.

        query: (num_tokens, num_heads, head_dim); key, value: (num_tokens, num_kv_heads, head_dim)
        kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim), mutated in place.
        Returns (num_tokens, num_heads, head_dim), written into `out` when given.
        A backend that `supports_cuda_graphs` also takes tensors with padding rows past
        metadata.num_tokens (slot -1): it skips their write and leaves their output unset.
        """
