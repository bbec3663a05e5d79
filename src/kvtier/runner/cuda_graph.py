"""CUDA graphs for decode-only steps: one graph per captured batch size, replayed padded.

A decode step launches a few hundred small kernels; replaying a captured graph removes their
launch cost. Every graph reads static buffers (token ids, positions, slot mapping, block table,
sequence lengths) that `run` refills in place before replay. Padding rows write their K/V into
a scratch block that no request owns and attend only to it; their logits are discarded.

Needs an attention backend whose decode path is capturable (`supports_cuda_graphs`): its
`prepare` runs once at capture, with `max_seq_len` set to the longest context a graph serves,
and its `forward` reads only metadata tensors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvtier.attention.base import AttentionBackend, AttentionMetadata
from kvtier.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from kvtier.runner.model_runner import PendingInputs

logger = logging.getLogger(__name__)

SPLIT_HORIZON_TOKENS = 4096


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend,
                 kv_caches: list[torch.Tensor], scratch_block: int, max_batch: int,
                 max_blocks_per_seq: int, block_size: int) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_blocks = max_blocks_per_seq
        device = kv_caches[0].device
        self.sizes = capture_sizes(max_batch)
        n = self.sizes[-1]
        # Token ids, positions, slots and sequence lengths travel in one int64 host->device
        # copy; the graph itself casts the lengths to the int32 the kernels read.
        self._device_vectors = torch.zeros((4, n), dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self._device_vectors[:3]
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_table = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32,
                                      device=device)
        # Two sets of pinned staging buffers, used in turn: with async scheduling a step is
        # staged while the copies of the one before may still be queued on the device.
        self._staging = [_Staging(n, max_blocks_per_seq, scratch_block) for _ in range(2)]
        self._next_staging = 0
        # Padding rows: token 0 at position 0, writing the scratch slot, context length 1.
        self._padding = torch.tensor([[0], [0], [scratch_block * block_size], [1]]).expand(
            4, n).numpy()
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}

    def _metadata(self, n: int) -> AttentionMetadata:
        # Sized for a typical context, not the longest: a backend that splits long contexts
        # would otherwise bake in splits that stay empty (but cost launches) on most steps.
        # Longer contexts stay correct, with fewer splits than ideal.
        max_len = min(self.max_blocks * self.block_size, SPLIT_HORIZON_TOKENS)
        metadata = AttentionMetadata(
            num_tokens=n, num_seqs=n, num_decodes=n,
            query_start_loc=self.query_start_loc[:n + 1], seq_lens=self.seq_lens[:n],
            block_table=self.block_table[:n], slot_mapping=self.slot_mapping[:n],
            query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=[max_len] * n,
            max_query_len=1, max_seq_len=max_len, block_size=self.block_size)
        self.backend.prepare(metadata)
        return metadata

    def _forward(self, n: int, metadata: AttentionMetadata) -> torch.Tensor:
        self.seq_lens[:n].copy_(self._device_vectors[3, :n])  # captured: runs on every replay
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, metadata)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.sizes):  # largest first: later graphs reuse its memory
            metadata = self._metadata(n)
            for _ in range(2):  # warm up (Triton compiles, cuBLAS picks kernels)
                self._forward(n, metadata)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[n] = self._forward(n, metadata)
            self._graphs[n] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.sizes[-1] and max_blocks <= self.max_blocks

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], slots: list[int],
            block_tables: list[list[int]], seq_lens: list[int],
            pending: PendingInputs | None = None) -> torch.Tensor:
        """Replay for a decode batch; returns logits (n, vocab) for the real rows. `pending`:
        rows whose token the previous step samples (their `token_ids` are placeholders).

        Only the block-table columns this batch uses are copied to the device, and only the
        entries a row gained since that staging set's last use are written on the host: the
        kernels read a row only up to its sequence length. A staging set is reused two steps
        later, when the host has waited for the tokens of the step that used it.
        """
        n = len(token_ids)
        size = next(s for s in self.sizes if s >= n)
        width = max(len(row) for row in block_tables)
        staging = self._staging[self._next_staging]
        self._next_staging ^= 1
        vectors = staging.vectors
        vectors[:, n:size] = self._padding[:, :size - n]
        vectors[0, :n] = token_ids
        vectors[1, :n] = positions
        vectors[2, :n] = slots
        vectors[3, :n] = seq_lens
        table = staging.table
        table[n:size, 0] = self.scratch_block
        sources = staging.row_sources
        for i, row in enumerate(block_tables):
            source, copied = sources[i]
            if source is not row or copied > len(row):
                copied = 0
            if copied < len(row):
                table[i, copied:len(row)] = row[copied:]
                sources[i] = (row, len(row))
        for i in range(n, size):
            sources[i] = (None, 0)  # padding overwrote column 0
        self._device_vectors[:, :size].copy_(staging.vectors_t[:, :size], non_blocking=True)
        self.block_table[:size, :width].copy_(staging.table_t[:size, :width],
                                              non_blocking=True)
        if pending is not None:
            pending.write_into(self.input_ids)
        self._graphs[size].replay()
        return self._logits[size][:n]


class _Staging:
    """Pinned host buffers for one step's graph inputs."""

    def __init__(self, n: int, max_blocks: int, scratch_block: int) -> None:
        self.vectors_t = torch.zeros((4, n), dtype=torch.int64, pin_memory=True)
        self.vectors: np.ndarray = self.vectors_t.numpy()
        self.table_t = torch.full((n, max_blocks), scratch_block, dtype=torch.int32,
                                  pin_memory=True)
        self.table: np.ndarray = self.table_t.numpy()
        self.row_sources: list[tuple[list[int] | None, int]] = [(None, 0)] * n
        """What each table row holds: (the block list it was copied from, entries copied).
        The KV manager only appends to a request's list while the request holds its blocks
        and starts a new list when it frees them, so the same list object means the copied
        entries are still right and only the new tail needs writing."""
