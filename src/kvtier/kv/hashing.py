"""Chained block hashes: the one key space shared by the device prefix cache and every tier.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal
prefixes. The chain starts from a root that covers everything else that changes the KV (model
identity, dtype, block size), so tiers shared between engines never mix incompatible KV.
BLAKE2b-128 is used because tiers outlive the process (disk, Redis): Python's `hash()` is salted
per process, and a non-cryptographic 64-bit hash would make collisions across a large shared store
plausible. At 128 bits a collision is not a practical concern, so hits are not re-verified token
by token.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from kvtier.types import BlockHash

_DIGEST_BYTES = 16


def root_block_hash(*identity: str) -> BlockHash:
    """The parent of every first block: a digest of what makes KV comparable (model, dtype, ...)."""
    return BlockHash(hashlib.blake2b("\x1f".join(identity).encode(),
                                     digest_size=_DIGEST_BYTES).digest())


def salted_root_hash(root: BlockHash, salt: str) -> BlockHash:
    """The root of a request with vLLM's `cache_salt`: its blocks' hashes differ from every
    other salt's (and from unsalted ones), so only requests with the same salt share KV."""
    return BlockHash(hashlib.blake2b(root + b"\x1fcache_salt\x1f" + salt.encode(),
                                     digest_size=_DIGEST_BYTES).digest())


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int],
                      extra_keys: bytes = b"") -> BlockHash:
    """Hash of one full block given its parent's hash, its token ids and optional extra keys."""
    digest = hashlib.blake2b(parent, digest_size=_DIGEST_BYTES)
    digest.update(array("I", token_ids).tobytes())
    if extra_keys:
        digest.update(extra_keys)
    return BlockHash(digest.digest())


def hash_request_blocks(root: BlockHash, token_ids: Sequence[int], block_size: int,
                        known: list[BlockHash]) -> list[BlockHash]:
    """Extend `known` (hashes of the first len(known) blocks) over every full block of token_ids.

    Mutates and returns `known`, so a request's hashes are computed once as its tokens grow.
    """
    num_full = len(token_ids) // block_size
    parent = known[-1] if known else root
    for index in range(len(known), num_full):
        start = index * block_size
        parent = hash_block_tokens(parent, token_ids[start:start + block_size])
        known.append(parent)
    return known
