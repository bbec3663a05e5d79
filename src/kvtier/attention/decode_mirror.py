"""Contiguous per-layer copies of the K/V of the sequences being decoded, for the torch backend.

On the CPU, gathering every decode's paged context each step costs more than the attention math:
at batch 32 and ~400 tokens of context it copies ~19 MB per layer, twice (index, then the
transposed matmul operand). The mirror keeps the running decodes' K/V in two buffers per layer,
so a decode step appends one token per sequence and attends straight out of them: keys
transposed, (rows, kv_heads, head_dim, capacity), values (rows, kv_heads, capacity, head_dim).
Both products then take an operand whose rows are contiguous, sliced to the longest context:
torch's CPU matmul copies a transposed operand that is not contiguous first (at batch 32 and
~350 tokens, cold, 0.74 ms a layer in float32 against 0.37 for the stored transpose).

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
    padding: torch.Tensor | None
    """(num_decodes, 1, 1, max_len) bool in row order, True = past the row's context; None
    when every context is max_len long."""
    appends: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """(decode index, row, position) of sequences whose row is valid: write one new token.
    None in the steady state (`in_order`), where decode i appends at row i."""
    append_positions: torch.Tensor | None
    """In order: (num_decodes,) int64, where each row's new token goes."""
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
class MirrorKV:
    """One layer's mirror."""

    keys_t: torch.Tensor
    """(row_capacity, kv_heads, head_dim, length_capacity): keys, transposed."""
    values: torch.Tensor
    """(row_capacity, kv_heads, length_capacity, head_dim)."""


@dataclass
class _LayerBuffer:
    kv: MirrorKV
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
        in_order = rows == list(range(n)) and [i for i, _, _ in appends] == list(range(n))
        append_tensors = append_positions = None
        if in_order:
            append_positions = (lens - 1).to(device)
        elif appends:
            append_tensors = tuple(torch.tensor(col, dtype=torch.int64, device=device)
                                   for col in zip(*appends, strict=True))
        padding = None
        if min(seq_lens) < max_len:
            padding = (torch.arange(max_len)[None, :] >= lens[:, None])[:, None, None, :]
            padding = padding.to(device)
        return MirrorStep(self._serial, row_tensor.to(device), order.to(device), lens.to(device),
                          padding, append_tensors, append_positions, fills, moves, max_len,
                          row_capacity, length_capacity, in_order)

    def forget_rows(self) -> None:
        """A step without decodes: no row stays valid across it (keeps the buffers)."""
        self._rows.clear()

    def reset(self) -> None:
        self.forget_rows()
        self._buffers.clear()
        self._row_capacity = self._length_capacity = 0

    def update(self, step: MirrorStep, kv_cache: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, block_table: torch.Tensor) -> MirrorKV:
        """Bring one layer's buffers up to date after the paged write."""
        buffer = self._buffer(step, kv_cache)
        keys_t, values = buffer.kv.keys_t, buffer.kv.values
        fills = step.fills
        if buffer.serial != step.serial - 1:  # this layer missed a step: refill every row
            fills = [(i, int(step.rows[i]), int(step.seq_lens[int(step.rows[i])]))
                     for i in range(len(step.rows))]
        else:
            for source, target in step.moves:
                keys_t[target].copy_(keys_t[source])
                values[target].copy_(values[source])
            if step.in_order:  # decode i appends at row i (step.rows is 0..n-1)
                n = len(step.rows)
                _append(buffer.kv, step.rows, step.append_positions, key[:n], value[:n])
            elif step.appends is not None:
                index, rows, positions = step.appends
                _append(buffer.kv, rows, positions, key[index], value[index])
        block_size = kv_cache.shape[2]
        for i, row, length in fills:
            blocks = block_table[i, :-(-length // block_size)].to(torch.int64)
            context = kv_cache[:, blocks].flatten(1, 2)[:, :length]  # (2, length, kvh, d)
            keys_t[row, :, :, :length].copy_(context[0].permute(1, 2, 0))
            values[row, :, :length].copy_(context[1].transpose(0, 1))
        buffer.serial = step.serial
        return buffer.kv

    def _buffer(self, step: MirrorStep, kv_cache: torch.Tensor) -> _LayerBuffer:
        key = kv_cache.data_ptr()
        buffer = self._buffers.get(key)
        _, _, _, kv_heads, head_dim = kv_cache.shape
        rows, length = step.row_capacity, step.length_capacity
        if buffer is not None and tuple(buffer.kv.values.shape[:3]) == (rows, kv_heads, length):
            return buffer
        # Finite zeros: rows past a sequence's length are masked but still multiplied.
        like = {"dtype": kv_cache.dtype, "device": kv_cache.device}
        grown = MirrorKV(torch.zeros(rows, kv_heads, head_dim, length, **like),
                         torch.zeros(rows, kv_heads, length, head_dim, **like))
        if buffer is None:
            buffer = _LayerBuffer(grown, serial=-1)
        else:
            old_rows, _, old_length, _ = buffer.kv.values.shape
            grown.keys_t[:old_rows, ..., :old_length].copy_(buffer.kv.keys_t)
            grown.values[:old_rows, :, :old_length].copy_(buffer.kv.values)
            buffer.kv = grown
        self._buffers[key] = buffer
        return buffer


def _append(kv: MirrorKV, rows: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor) -> None:
    """Write one token per row: key[i] and value[i] (kv_heads, head_dim) at positions[i]."""
    kv.keys_t[rows, :, :, positions] = key
    kv.values[rows, :, positions] = value


def _round_up(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


def attend(query: torch.Tensor, kv: MirrorKV, step: MirrorStep, scale: float) -> torch.Tensor:
    """Decode attention straight out of the mirror: (n, H, D) queries in decode order ->
    (n, H, D). Computed in row order, over the longest context's keys; shorter rows are
    masked (the buffers past a context hold finite values)."""
    n, num_heads, head_dim = query.shape
    num_kv_heads, length = kv.values.shape[1], step.max_len
    ordered = query if step.in_order else query.index_select(0, step.order)
    q = ordered.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(q, kv.keys_t[:n, ..., :length]).float() * scale  # (n, KVH, G, L)
    if step.padding is not None:
        scores.masked_fill_(step.padding, float("-inf"))
    probs = scores.softmax(dim=-1).to(query.dtype)
    out = torch.matmul(probs, kv.values[:n, :, :length]).view(n, num_heads, head_dim)
    return out if step.in_order else out.index_select(0, step.rows)
