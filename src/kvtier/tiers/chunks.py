"""Chunks (the unit a tier stores) and the reuse counter behind `--kv-store-min-hits`.

A chunk is a run of consecutive full blocks aligned to `chunk_blocks` from the start of the
sequence, keyed by its last block's chained hash; a sequence's last chunk may be shorter (its
trailing full blocks are not thrown away).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvtier.types import BlockHash


@dataclass(frozen=True)
class Chunk:
    block_hashes: tuple[BlockHash, ...]

    @property
    def key(self) -> BlockHash:
        return self.block_hashes[-1]


def chunk_runs(block_hashes: list[BlockHash], start: int, end: int,
               chunk_blocks: int) -> list[Chunk]:
    """Chunk-aligned runs covering blocks [start, end) (from the chunk holding `start`)."""
    first = start - start % chunk_blocks
    return [Chunk(tuple(block_hashes[i:min(i + chunk_blocks, end)]))
            for i in range(first, end, chunk_blocks) if i < end]


class ReuseCounter:
    """How many requests contained each chunk (bounded LRU of chunk keys)."""

    def __init__(self, max_keys: int = 1 << 20) -> None:
        self.max_keys = max_keys
        self._seen: OrderedDict[BlockHash, int] = OrderedDict()

    def note(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            self._seen[chunk.key] = self._seen.pop(chunk.key, 0) + 1
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)

    def count(self, chunk: Chunk) -> int:
        return self._seen.get(chunk.key, 0)
