"""Chunks (the unit a tier stores) and the reuse counter behind `--kv-store-min-hits`.

A chunk is a run of consecutive full blocks aligned to `chunk_blocks` from the start of the
sequence, keyed by its last block's chained hash; a sequence's last chunk may be shorter (its
trailing full blocks are not thrown away).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from kvtier.types import BlockHash


@dataclass(frozen=True)
class Chunk:
    block_hashes: tuple[BlockHash, ...]
    prefix_blocks: int = 0
    """Blocks of the prompt it was cut from (0: its own): what a later load of this chunk
    is part of, for admission."""

    @property
    def key(self) -> BlockHash:
        return self.block_hashes[-1]


def chunk_runs(block_hashes: list[BlockHash], start: int, end: int,
               chunk_blocks: int) -> list[Chunk]:
    """Chunk-aligned runs covering blocks [start, end) (from the chunk holding `start`)."""
    first = start - start % chunk_blocks
    return [Chunk(tuple(block_hashes[i:min(i + chunk_blocks, end)]), len(block_hashes))
            for i in range(first, end, chunk_blocks) if i < end]


class ReuseCounter:
    """How many requests contained each chunk (bounded LRU of chunk keys), and the workload's
    recent reuse rate: the share of the blocks noted by the last requests (at least
    `window_blocks` blocks and `min_notes` requests) whose chunk an earlier request had
    contained (what `--kv-store-min-hits auto` decides by)."""

    def __init__(self, max_keys: int = 1 << 20, window_blocks: int = 4096,
                 min_notes: int = 32) -> None:
        if window_blocks < 1 or min_notes < 1:
            raise ValueError(f"window_blocks {window_blocks} and min_notes {min_notes} must "
                             "be >= 1")
        self.max_keys = max_keys
        self.window_blocks = window_blocks
        self.min_notes = min_notes
        """The window also spans at least this many requests: on a small pool a window of
        its blocks is two or three prompts, whose first uses say nothing about reuse."""
        self._seen: OrderedDict[BlockHash, int] = OrderedDict()
        self._recent: deque[tuple[int, int]] = deque()
        """(blocks, blocks seen before) of each recent `note`, oldest first."""
        self._recent_blocks = 0
        self._recent_repeated = 0

    def note(self, chunks: list[Chunk]) -> None:
        blocks = repeated = 0
        for chunk in chunks:
            before = self._seen.pop(chunk.key, 0)
            self._seen[chunk.key] = before + 1
            blocks += len(chunk.block_hashes)
            if before:
                repeated += len(chunk.block_hashes)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        self._recent.append((blocks, repeated))
        self._recent_blocks += blocks
        self._recent_repeated += repeated
        # Keep the newest note whole even when it alone is longer than the window.
        while len(self._recent) > self.min_notes and (
                self._recent_blocks - self._recent[0][0] >= self.window_blocks):
            old_blocks, old_repeated = self._recent.popleft()
            self._recent_blocks -= old_blocks
            self._recent_repeated -= old_repeated

    def count(self, chunk: Chunk) -> int:
        return self._seen.get(chunk.key, 0)

    @property
    def window_full(self) -> bool:
        """Whether a whole window has been noted (the rate means something)."""
        return self._recent_blocks >= self.window_blocks and len(self._recent) >= self.min_notes

    @property
    def reuse_rate(self) -> float:
        """Share of the recently noted blocks that an earlier request had contained."""
        return self._recent_repeated / self._recent_blocks if self._recent_blocks else 0.0
