"""The device KV block pool: reference counts, the prefix-cache hash index and LRU eviction.

Every block is in exactly one state:

    in use      ref_cnt > 0                 (owned by one or more requests' block tables)
    free/clean  ref_cnt == 0, no hash       (`_free_clean`; handed out first)
    free/cached ref_cnt == 0, hashed        (`_free_cached`, an LRU: head = least recently freed)

Freed blocks keep their hash, so a later request with the same prefix can take them back
(`touch`) until `allocate` needs the space and evicts them from the LRU head. Eviction first
tells the `EvictionListener` (the tier stack) which hashes are about to vanish; the tier
captures what it stores before returning, so an evicted block is free for its new owner at
once.

Pure Python: no torch. The KV data itself lives in the runner; this class only assigns ids.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from kvtier.types import BlockHash


class NoFreeBlocksError(RuntimeError):
    """Raised by `allocate` when fewer blocks are free than asked for; nothing was allocated."""


class EvictionListener(Protocol):
    """Told about cached blocks just before their ids are reused, or dropped by a reset
    (`reused=False`); their data is still intact."""

    def on_evict(self, evicted: list[tuple[BlockHash, int]], reused: bool = True) -> None: ...


@dataclass(slots=True)  # one per block: a small model on a large card has millions
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    """Fixed set of `num_blocks` KV blocks with reference counts and a hash index."""

    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 eviction_listener: EvictionListener | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.eviction_listener = eviction_listener
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free_clean: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, BlockHash] = OrderedDict()
        """Free cached block id -> its hash (so the eviction window's hashes read at C speed)."""
        self._hash_to_block: dict[BlockHash, int] = {}
        self.num_evictions = 0
        self.num_cached_total = 0
        """Blocks ever registered under a new hash: a changed count means new prefix hits."""

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` could hand out now."""
        return len(self._free_clean) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (cached-but-free blocks count as free)."""
        in_use = self.num_blocks - len(self._free_clean) - len(self._free_cached)
        return in_use / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        """Id of the block holding this hash, in use or free, or None."""
        return self._hash_to_block.get(block_hash)

    def is_evictable(self, block_id: int) -> bool:
        return self.blocks[block_id].ref_cnt == 0 and block_id in self._free_cached

    def next_evictions(self, num_blocks: int,
                       among: Mapping[BlockHash, object] | AbstractSet[BlockHash] | None = None,
                       ) -> list[BlockHash]:
        """Hashes of the cached blocks that the next `num_blocks` allocated blocks would evict,
        in eviction order (for proactive tier stores), only those in `among` if given: none
        while never-used blocks last, as `allocate` takes those first. The scheduler asks
        every step, with a window of ~800 blocks on S's shape: the window is sliced and
        intersected in C, and walked in Python only when some of it is in `among` (a
        per-block walk cost ~130 us a step on the H200's host)."""
        num_evicted = num_blocks - len(self._free_clean)
        if num_evicted <= 0:
            return []
        window = list(itertools.islice(self._free_cached.values(), num_evicted))
        if among is None:
            return window
        keys = among.keys() if isinstance(among, Mapping) else among
        if keys.isdisjoint(window):
            return []
        return [block_hash for block_hash in window if block_hash in among]

    # -- mutations ---------------------------------------------------------------------------

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit); free ones leave the LRU."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free_cached[block_id]
            block.ref_cnt += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out `num_blocks` blocks with ref_cnt 1, evicting LRU cached blocks if needed."""
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        taken: list[int] = []
        while self._free_clean and len(taken) < num_blocks:
            taken.append(self._free_clean.popleft())
        if len(taken) < num_blocks:
            taken.extend(self._evict(num_blocks - len(taken)))
        for block_id in taken:
            self.blocks[block_id].ref_cnt = 1
        return taken

    def _evict(self, num_blocks: int) -> list[int]:
        victims = list(itertools.islice(self._free_cached, num_blocks))
        evicted: list[tuple[BlockHash, int]] = []
        for block_id in victims:
            del self._free_cached[block_id]
            block = self.blocks[block_id]
            assert block.block_hash is not None
            evicted.append((block.block_hash, block_id))
        if evicted and self.eviction_listener is not None:
            self.eviction_listener.on_evict(evicted)
        for block_hash, block_id in evicted:
            del self._hash_to_block[block_hash]
            self.blocks[block_id].block_hash = None
        self.num_evictions += len(evicted)
        return victims

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the given order.

        Blocks reaching zero join the tail of their free list, so pass a request's blocks
        last-first: its tail blocks (least likely to be shared) are then evicted first.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block_id} freed more often than allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    self._free_cached[block_id] = block.block_hash
                else:
                    self._free_clean.append(block_id)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a fully computed block under its hash; False if that hash is already cached.

        A duplicate (two requests computed the same prefix in one step) stays unhashed and
        returns to the clean list when freed.
        """
        if not self.enable_caching:
            return False
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._hash_to_block:
            return block.block_hash == block_hash
        block.block_hash = block_hash
        self._hash_to_block[block_hash] = block_id
        self.num_cached_total += 1
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every free cached block's hash; returns how many were dropped."""
        dropped = list(self._free_cached)
        if dropped and self.eviction_listener is not None:
            self.eviction_listener.on_evict(
                [(self.blocks[b].block_hash, b) for b in dropped],  # type: ignore[misc]
                reused=False)
        for block_id in dropped:
            del self._free_cached[block_id]
            block = self.blocks[block_id]
            assert block.block_hash is not None
            del self._hash_to_block[block.block_hash]
            block.block_hash = None
            self._free_clean.append(block_id)
        return len(dropped)

    def check_integrity(self) -> None:
        """Assert the invariants in the module docstring; tests call it after every operation."""
        clean, cached = set(self._free_clean), set(self._free_cached)
        assert len(clean) == len(self._free_clean), "duplicate id in the clean free list"
        assert not clean & cached, "block in both free lists"
        for block_id, block_hash in self._free_cached.items():
            assert self.blocks[block_id].block_hash == block_hash, "stale hash in the LRU"
        for block in self.blocks:
            is_free = block.block_id in clean or block.block_id in cached
            assert block.ref_cnt >= 0
            assert is_free == (block.ref_cnt == 0), f"block {block.block_id}: ref/free mismatch"
            if block.block_id in clean:
                assert block.block_hash is None, f"clean block {block.block_id} has a hash"
            if block.block_id in cached:
                assert block.block_hash is not None, f"cached block {block.block_id} lacks a hash"
            if block.block_hash is not None:
                assert self._hash_to_block.get(block.block_hash) == block.block_id
        assert len(self._hash_to_block) == sum(b.block_hash is not None for b in self.blocks)
