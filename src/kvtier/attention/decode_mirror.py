"""Contiguous per-layer copies of the K/V of the sequences being decoded, for the torch backend.

On the CPU, gathering every decode's paged context each step costs more than the attention math:
at batch 32 and ~400 tokens of context it copies ~19 MB per layer, twice (index, then the
transposed matmul operand). The mirror keeps the running decodes' K/V in one
(2, rows, kv_heads, capacity, head_dim) buffer per layer, so a decode step appends one token per
sequence and attends straight out of the buffer.

Rows live only across consecutive steps: a sequence that is not decoded in a step (finished,
preempted, still prefilling, or skipped by the scheduler) loses its row and is gathered again
from the paged cache the next time it decodes. That keeps the mirror an exact copy of the paged
cache: a preempted sequence's recomputed K/V are never mixed with the old ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_LENGTH_QUANTUM = 64
_ROW_QUANTUM = 4


@dataclass
class MirrorStep:
    """What one step does to the mirror; derived once in `prepare`, applied by every layer."""

    serial: int
    rows: torch.Tensor
    """(num_decodes,) int64: the mirror row of each decode."""
    order: torch.Tensor
    """(num_decodes,) int64: the decode held by each row (the inverse of `rows`)."""
    seq_lens: torch.Tensor
    """(num_decodes,) int64: context length of each row's sequence after this step."""
    padding: torch.Tensor
    """(num_decodes, 1, 1, length_capacity) bool in row order, True = past the row's
    context."""
    appends: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """(decode index, row, position) of sequences whose row is valid: write one new token."""
    fills: list[tuple[int, int, int]]
    """(decode index, row, seq_len) of sequences gathered from the paged cache this step."""
    moves: list[tuple[int, int]]
    """(from row, to row): valid rows moved down to keep the rows in use compact."""
    max_len: int
    row_capacity: int
    length_capacity: int
    in_order: bool = False
    """Decode i holds row i and appends (the steady state): attention and the appends skip
    the gathers by `order`, `rows` and the append index."""


@dataclass
class _LayerBuffer:
    kv: torch.Tensor
    """(2, row_capacity, kv_heads, length_capacity, head_dim)."""
    serial: int


class DecodeMirror:
    """Row bookkeeping (scheduler thread, once per step) and per-layer buffers."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[int, int]] = {}
        """Sequence id -> (its row, the tokens that row holds) after the previous step."""
        self._serial = 0
        self._buffers: dict[int, _LayerBuffer] = {}
        self._row_capacity = 0
        self._length_capacity = 0
        self.pool_tokens = 0
        """Size of the paged pool in tokens (learned from the first cache seen). The mirror's
        rows in use never span more than twice that, which bounds its memory."""

    def plan(self, seq_ids: list[str], seq_lens: list[int], device: torch.device
             ) -> MirrorStep | None:
        """Assign rows for this step's decodes; None when the mirror would exceed its budget
        (the caller gathers from the paged cache instead)."""
        self._serial += 1
        n, max_len = len(seq_ids), max(seq_lens)
        row_capacity = max(self._row_capacity, _round_up(n, _ROW_QUANTUM))
        length_capacity = self._length_capacity
        if max_len > length_capacity:
            length_capacity = _round_up(max(max_len, length_capacity * 3 // 2), _LENGTH_QUANTUM)
        budget = 2 * self.pool_tokens
        if row_capacity * length_capacity > budget:  # start over at exactly this step's size
            self.reset()
            row_capacity = _round_up(n, _ROW_QUANTUM)
            length_capacity = _round_up(max_len, _LENGTH_QUANTUM)
            if row_capacity * length_capacity > budget:
                return None
        self._row_capacity, self._length_capacity = row_capacity, length_capacity

        rows: list[int | None] = [None] * n
        kept: dict[int, int] = {}  # decode index -> its valid row from the previous step
        for i, (seq_id, length) in enumerate(zip(seq_ids, seq_lens, strict=True)):
            row, held = self._rows.get(seq_id, (None, 0))
            if row is not None and held == length - 1:
                kept[i] = row
        free = sorted(set(range(n)) - {r for r in kept.values() if r < n}, reverse=True)
        moves: list[tuple[int, int]] = []
        appends: list[tuple[int, int, int]] = []
        fills: list[tuple[int, int, int]] = []
        for i in range(n):
            row = kept.get(i)
            if row is not None and row >= n:
                target = free.pop()
                moves.append((row, target))
                row = target
            if row is not None:
                rows[i] = row
                appends.append((i, row, seq_lens[i] - 1))
        for i in range(n):
            if rows[i] is None:
                rows[i] = free.pop()
                fills.append((i, rows[i], seq_lens[i]))
        self._rows = {seq_id: (row, length)
                      for seq_id, row, length in zip(seq_ids, rows, seq_lens, strict=True)}

        row_tensor = torch.tensor(rows, dtype=torch.int64)
        order = torch.empty_like(row_tensor)
        order[row_tensor] = torch.arange(n)
        lens = torch.tensor(seq_lens, dtype=torch.int64)[order]
        append_tensors = None
        if appends:
            append_tensors = tuple(torch.tensor(col, dtype=torch.int64, device=device)
                                   for col in zip(*appends, strict=True))
        padding = (torch.arange(length_capacity)[None, :] >= lens[:, None])[:, None, None, :]
        in_order = rows == list(range(n)) and [i for i, _, _ in appends] == list(range(n))
        return MirrorStep(self._serial, row_tensor.to(device), order.to(device), lens.to(device),
                          padding.to(device), append_tensors, fills, moves, max_len, row_capacity,
                          length_capacity, in_order)

    def forget_rows(self) -> None:
        """A step without decodes: no row stays valid across it (keeps the buffers)."""
        self._rows.clear()

    def reset(self) -> None:
        self.forget_rows()
        self._buffers.clear()
        self._row_capacity = self._length_capacity = 0

    def update(self, step: MirrorStep, kv_cache: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """Bring one layer's buffer up to date after the paged write; returns it as
        (2, rows, kv_heads, capacity, head_dim)."""
        buffer = self._buffer(step, kv_cache)
        kv = buffer.kv
        fills = step.fills
        if buffer.serial != step.serial - 1:  # this layer missed a step: refill every row
            fills = [(i, int(step.rows[i]), int(step.seq_lens[int(step.rows[i])]))
                     for i in range(len(step.rows))]
        else:
            for source, target in step.moves:
                kv[:, target].copy_(kv[:, source])
            if step.appends is not None:
                index, rows, positions = step.appends
                if step.in_order:  # decode i appends: its key is key[i]
                    key, value = key[:len(rows)], value[:len(rows)]
                else:
                    key, value = key[index], value[index]
                kv[0][rows, :, positions] = key
                kv[1][rows, :, positions] = value
        block_size = kv_cache.shape[2]
        for i, row, length in fills:
            blocks = block_table[i, :-(-length // block_size)].to(torch.int64)
            context = kv_cache[:, blocks].flatten(1, 2)[:, :length]  # (2, length, kvh, d)
            kv[:, row, :, :length].copy_(context.transpose(1, 2))
        buffer.serial = step.serial
        return kv

    def _buffer(self, step: MirrorStep, kv_cache: torch.Tensor) -> _LayerBuffer:
        key = kv_cache.data_ptr()
        buffer = self._buffers.get(key)
        _, _, _, kv_heads, head_dim = kv_cache.shape
        shape = (2, step.row_capacity, kv_heads, step.length_capacity, head_dim)
        if buffer is not None and tuple(buffer.kv.shape) == shape:
            return buffer
        # Finite zeros: rows past a sequence's length are masked but still multiplied.
        grown = torch.zeros(shape, dtype=kv_cache.dtype, device=kv_cache.device)
        if buffer is None:
            buffer = _LayerBuffer(grown, serial=-1)
        else:
            _, rows, _, length, _ = buffer.kv.shape
            grown[:, :rows, :, :length].copy_(buffer.kv)
            buffer.kv = grown
        self._buffers[key] = buffer
        return buffer


def _round_up(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


def attend(query: torch.Tensor, kv: torch.Tensor, step: MirrorStep, scale: float) -> torch.Tensor:
    """Decode attention straight out of the mirror: (n, H, D) queries in decode order ->
    (n, H, D). Computed in row order; K is used transposed in place (no copy).

    In float32 the keys attended are the longest context's. In bfloat16 and float16, torch's
    CPU matmul copies a transposed operand that is not contiguous before multiplying (at
    batch 32 and ~300 tokens, 0.45 ms a layer where the product takes 0.09), so there every
    row's whole capacity is attended, contiguous, up to 1.5x the keys, under the mask (the
    buffer past a context holds finite values)."""
    n, num_heads, head_dim = query.shape
    num_kv_heads = kv.shape[2]
    ordered = query if step.in_order else query.index_select(0, step.order)
    q = ordered.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    length = step.max_len if kv.dtype == torch.float32 else kv.shape[3]
    k = kv[0, :n, :, :length]  # (n, KVH, L, D)
    v = kv[1, :n, :, :length]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (n, KVH, G, L)
    scores.masked_fill_(step.padding[..., :length], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).view(n, num_heads, head_dim)
    return out if step.in_order else out.index_select(0, step.rows)
