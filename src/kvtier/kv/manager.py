"""Per-request block tables on top of the block pool: prefix lookup, slot allocation, freeing.

The scheduler's only interface to device KV memory. A request's block table covers its tokens in
order; token `t` lives in block `block_table[t // block_size]` at offset `t % block_size`:

    tokens    |0 ........ 15|16 ....... 31|32 .. 40 _ _ _ _ _ _|
    blocks    |   hit (A)   |   hit (B)   |   new (C)          |
              '-- computed by an earlier request --'  computed this step

Full blocks are registered in the prefix cache after the step that computes them
(`cache_computed_blocks`), keyed by the request's chained block hashes.
"""

from __future__ import annotations

from kvtier.kv.block_pool import BlockPool
from kvtier.kv.hashing import hash_request_blocks
from kvtier.request import Request
from kvtier.types import BlockHash
from kvtier.utils.math import cdiv


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, root_hash: BlockHash) -> None:
        self.pool = pool
        self.block_size = block_size
        self.root_hash = root_hash
        self._block_tables: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def enable_caching(self) -> bool:
        return self.pool.enable_caching

    def block_table(self, request_id: str) -> list[int]:
        return self._block_tables.get(request_id, [])

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of every full block of the request's tokens (memoised on the request)."""
        return hash_request_blocks(request.hash_root or self.root_hash, request.all_token_ids,
                                   self.block_size, request.block_hashes)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Cached blocks covering the longest prefix of the request, and how many tokens that is.

        At most `num_tokens - 1` tokens are reported, so at least one token is computed and the
        step yields logits. Takes no references: pass the blocks to `allocate_slots`. A request
        asking for prompt logprobs gets no hit: it needs the logits of every prompt position
        (vLLM does the same).
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for block_hash in self.block_hashes(request)[:max_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            hit.append(block_id)
        return hit, len(hit) * self.block_size

    def estimate_cached_blocks(self, request: Request) -> int:
        """How many leading blocks of the request the device cache holds, by binary search.

        Cheap enough to rank many waiting requests each step. Exact when the cached blocks of a
        prefix form a prefix themselves, which LRU eviction of tail-first freed blocks keeps
        true almost always; `get_computed_blocks` is the exact walk."""
        if not self.enable_caching:
            return 0
        hashes = self.block_hashes(request)
        low, high = 0, min(len(hashes), (request.num_tokens - 1) // self.block_size)
        while low < high:
            middle = (low + high + 1) // 2
            if self.pool.get_cached_block(hashes[middle - 1]) is not None:
                low = middle
            else:
                high = middle - 1
        return low

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` (prefix hits, only before the request's first step) are appended
        first and referenced. Returns False, changing nothing, when the pool lacks blocks.
        """
        if not new_computed_blocks:
            table = self._block_tables.get(request.request_id)
            if table is not None and (request.num_computed_tokens + num_new_tokens
                                      <= len(table) * self.block_size):
                return True  # the common decode step: its slot is in a block it holds
        hits = new_computed_blocks or []
        table = self._block_tables.setdefault(request.request_id, [])
        assert not hits or (not table and request.num_computed_tokens == 0)
        num_tokens = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_required = cdiv(num_tokens, self.block_size) - len(table) - len(hits)
        # Touching a free cached hit removes it from the free pool as well.
        num_free_hits = sum(1 for b in hits if self.pool.is_evictable(b))
        if num_required + num_free_hits > self.pool.num_free_blocks:
            if not table:
                del self._block_tables[request.request_id]
            return False
        self.pool.touch(hits)
        table.extend(hits)
        if num_required > 0:
            table.extend(self.pool.allocate(num_required))
        self._num_cached_blocks.setdefault(request.request_id, len(hits))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly completed full blocks in the prefix cache."""
        rid = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        num_cached = self._num_cached_blocks.get(rid, 0)
        if not self.enable_caching or num_full <= num_cached:
            return
        hashes = self.block_hashes(request)
        table = self._block_tables[rid]
        for index in range(num_cached, num_full):
            self.pool.cache_block(table[index], hashes[index])
        self._num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so shared prefix blocks are evicted last."""
        table = self._block_tables.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free(reversed(table))

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage
