"""Device KV block bookkeeping: hashing, the block pool, per-request block tables. Pure Python."""

from kvtier.kv.block_pool import BlockPool, EvictionListener, NoFreeBlocksError
from kvtier.kv.hashing import (
    hash_block_tokens,
    hash_request_blocks,
    root_block_hash,
    salted_root_hash,
)
from kvtier.kv.manager import KVCacheManager

__all__ = ["BlockPool", "EvictionListener", "NoFreeBlocksError", "KVCacheManager",
           "hash_block_tokens", "hash_request_blocks", "root_block_hash", "salted_root_hash"]
