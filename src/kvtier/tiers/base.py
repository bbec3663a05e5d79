"""The tier-store interface: what a KV tier below the device pool must do, and its contract.

An entry is the KV of a run of consecutive full blocks (a chunk, `--kv-tier-chunk-tokens`,
or a shorter trailing run), stored as one contiguous byte payload laid out
(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim) in the engine's dtype. Its key
is the chained hash of its last block, which identifies the whole prefix up to that block;
every block hash of the entry is indexed, so a lookup can enter an entry at any block.

Contract (every store, local or networked):
- `locate` / `has` only consult the index: cheap, never block on I/O.
- Stores are two-phase: `prepare_store` reserves capacity (evicting by policy, never exceeding
  `capacity_bytes`) and returns a buffer to fill; `complete_store` publishes or drops it.
  A prepared entry is invisible to lookups until completed.
- `read` returns the payload or raises `TierError` (I/O error, corrupt, truncated, checksum
  mismatch); the store drops such an entry itself and counts the error.
- `pin(key)` protects an entry from eviction from the lookup that plans its load until the
  transfer has read it (or the plan is given back); `unpin` releases it.
- Methods may be called from the scheduler thread and from transfer threads: stores lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvtier.tiers.policy import EvictionPolicy
from kvtier.types import BlockHash

if TYPE_CHECKING:  # annotations only: the front ends read TierStats without torch
    import torch


class TierError(Exception):
    """A tier could not serve or take an entry; the caller treats it as a miss."""


@dataclass(frozen=True)
class KVLayout:
    """What an entry's bytes mean. Its digest namespaces every key, local or remote."""

    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype_bytes: int

    @property
    def block_bytes(self) -> int:
        return (2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
                * self.dtype_bytes)

    @property
    def namespace(self) -> str:
        text = (f"{self.model_id}|{self.dtype}|L{self.num_layers}|H{self.num_kv_heads}|"
                f"D{self.head_dim}|B{self.block_size}")
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class EntryMeta:
    key: BlockHash
    """Hash of the entry's last block."""
    block_hashes: tuple[BlockHash, ...]
    num_bytes: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)


@dataclass
class TierStats:
    """Counters since start, per tier."""

    num_stored_entries: int = 0
    num_stored_bytes: int = 0
    num_loaded_bytes: int = 0
    num_hit_blocks: int = 0
    num_evictions: int = 0
    num_never_read_evictions: int = 0
    """Entries that left the tier without ever being read."""
    num_errors: int = 0
    num_rejected: int = 0
    """Stores refused (no evictable capacity, or the tier is unusable)."""
    used_bytes: int = 0
    """Bytes the tier's entries occupy, as of the engine's last `get_stats` (a shared tier:
    the entries this replica knows of). A gauge, unlike the counters above."""
    capacity_bytes: int = 0


@dataclass
class _Entry:
    meta: EntryMeta
    location: object
    """Store-specific: a slot id, a file path, a remote key."""
    pins: int = 0
    num_reads: int = 0
    ready: bool = False


@dataclass
class StoreHandle:
    """A reserved, not yet published entry; fill `buffer` (uint8, meta.num_bytes) and complete."""

    meta: EntryMeta
    buffer: torch.Tensor
    location: object = None
    extra: dict = field(default_factory=dict)


EvictCallback = Callable[[EntryMeta, "torch.Tensor"], None]
"""Called with an entry and its payload as it is evicted (demotion to the next tier)."""


class TierStore(ABC):
    """Shared index, capacity and eviction logic; subclasses move the bytes."""

    name = "base"

    def __init__(self, layout: KVLayout, capacity_bytes: int, policy: EvictionPolicy) -> None:
        self.layout = layout
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.stats = TierStats()
        self.on_evict: EvictCallback | None = None
        self._lock = threading.RLock()
        self._entries: dict[BlockHash, _Entry] = {}
        self._block_index: dict[BlockHash, tuple[BlockHash, int]] = {}
        self._other_holders: dict[BlockHash, list[tuple[BlockHash, int]]] = {}
        """Entries that hold a block the index already names for another entry (a trailing
        partial chunk, then its full chunk): the index falls back to them when that one goes."""
        self._orphan_pins: dict[BlockHash, int] = {}
        """Pins of entries dropped while loads held them (a failed read, another replica's
        removal). Those loads unpin later: a new entry of the key inherits the pins, so the
        unpins never take one that a later load holds (before, its count went below zero:
        an AssertionError out of the scheduler's poll)."""
        self.used_bytes = 0

    # -- index -------------------------------------------------------------------------------

    def locate(self, block_hash: BlockHash) -> tuple[EntryMeta, int] | None:
        """The ready entry holding this block and the block's index in it, or None."""
        with self._lock:
            found = self._block_index.get(block_hash)
            if found is None:
                return None
            entry = self._entries[found[0]]
            return (entry.meta, found[1]) if entry.ready else None

    def has(self, key: BlockHash) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.ready

    def has_block(self, block_hash: BlockHash) -> bool:
        """Any entry (ready or being stored) already holds this block."""
        with self._lock:
            return block_hash in self._block_index

    def missing_blocks(self, block_hashes: list[BlockHash]) -> list[BlockHash]:
        """Those of `block_hashes` that no entry holds (one lock for the whole batch)."""
        with self._lock:
            index = self._block_index
            return [block_hash for block_hash in block_hashes if block_hash not in index]

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    def ready_entries(self) -> list[EntryMeta]:
        """Every ready entry, oldest stored first."""
        with self._lock:
            return [entry.meta for entry in self._entries.values() if entry.ready]

    def payload_copy(self, key: BlockHash) -> torch.Tensor | None:
        """A copy of a ready entry's payload, not counted as a read; None if it is gone."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.ready:
                return None
            return self._payload_for_demotion(entry).clone()

    def pin(self, key: BlockHash) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.ready:
                return False
            entry.pins += 1
            return True

    def unpin(self, key: BlockHash) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins -= 1
                assert entry.pins >= 0
            elif key in self._orphan_pins:  # dropped while pinned, not stored again since
                self._orphan_pins[key] -= 1
                if not self._orphan_pins[key]:
                    del self._orphan_pins[key]

    # -- capacity ----------------------------------------------------------------------------

    def _entry_bytes(self, meta: EntryMeta) -> int:
        """Capacity an entry occupies (a slot store rounds up to its slot size)."""
        return meta.num_bytes

    def charged_bytes(self, meta: EntryMeta) -> int:
        """The capacity this store would charge an entry of `meta`."""
        return self._entry_bytes(meta)

    def _reserve(self, meta: EntryMeta, location: object) -> bool:
        """Make room (evicting) and register a not-ready entry; False if it cannot fit."""
        size = self._entry_bytes(meta)
        if size > self.capacity_bytes:
            return False
        while self.used_bytes + size > self.capacity_bytes or not self._has_room(meta):
            if not self._evict_one():
                return False
        self._register(meta, location)
        return True

    def _register(self, meta: EntryMeta, location: object) -> _Entry:
        """Index a new, not-ready entry and count its bytes (room already made)."""
        entry = self._entries[meta.key] = _Entry(meta, location,
                                                 pins=self._orphan_pins.pop(meta.key, 0))
        for index, block_hash in enumerate(meta.block_hashes):
            if block_hash in self._block_index:
                self._other_holders.setdefault(block_hash, []).append((meta.key, index))
            else:
                self._block_index[block_hash] = (meta.key, index)
        self.used_bytes += self._entry_bytes(meta)
        return entry

    def _has_room(self, meta: EntryMeta) -> bool:
        """Store-specific extra condition (a free slot); capacity is checked separately."""
        return True

    def _evict_one(self) -> bool:
        def evictable(key: object) -> bool:
            entry = self._entries.get(key)  # type: ignore[call-overload]
            return entry is not None and entry.ready and entry.pins == 0
        victim = self.policy.victim(evictable)
        if victim is None:
            return False
        entry = self._entries[victim]  # type: ignore[index]
        if self.on_evict is not None:
            with contextlib.suppress(TierError):  # demotion is best effort
                self.on_evict(entry.meta, self._payload_for_demotion(entry))
        self.stats.num_evictions += 1
        self.stats.num_never_read_evictions += entry.num_reads == 0
        self._drop(entry.meta.key)
        return True

    def _drop(self, key: BlockHash) -> None:
        """Forget an entry and free its storage (caller holds the lock)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.pins:  # the loads holding it unpin later: not a new entry's pins
            self._orphan_pins[key] = entry.pins
        for index, block_hash in enumerate(entry.meta.block_hashes):
            others = self._other_holders.get(block_hash)
            if self._block_index.get(block_hash, (None,))[0] == key:
                if others:
                    self._block_index[block_hash] = others.pop(0)
                else:
                    del self._block_index[block_hash]
            elif others is not None:
                others.remove((key, index))
            if others is not None and not others:
                del self._other_holders[block_hash]
        self.policy.remove(key)
        self.used_bytes -= self._entry_bytes(entry.meta)
        self._release(entry)

    def _finish_store(self, meta: EntryMeta, success: bool) -> _Entry | None:
        """Publish a prepared entry (ready, in the policy, counted) or drop it (caller holds
        the lock); returns the published entry, None when dropped or already gone."""
        entry = self._entries.get(meta.key)
        if entry is None:
            return None
        if not success:
            self._drop(meta.key)
            return None
        entry.ready = True
        self.policy.insert(meta.key)
        self.stats.num_stored_entries += 1
        self.stats.num_stored_bytes += meta.num_bytes
        return entry

    def remove(self, key: BlockHash) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> int:
        """Drop every ready entry that no load holds (a cache reset); returns how many. A
        shared store's (Redis) entries go for every replica."""
        with self._lock:
            keys = [key for key, entry in self._entries.items()
                    if entry.ready and entry.pins == 0]
            for key in keys:
                self._drop(key)
        return len(keys)

    # -- store-specific ----------------------------------------------------------------------

    @abstractmethod
    def prepare_store(self, meta: EntryMeta) -> StoreHandle | None:
        """Reserve room for `meta`; None if it cannot be stored now (counted as rejected)."""

    @abstractmethod
    def complete_store(self, handle: StoreHandle, success: bool) -> None:
        """Publish the filled entry (or drop it when success is False or writing fails)."""

    @abstractmethod
    def read(self, meta: EntryMeta) -> torch.Tensor:
        """The entry's payload (uint8, meta.num_bytes); raises TierError and drops the entry on
        any failure. Call between pin and unpin."""

    @abstractmethod
    def _release(self, entry: _Entry) -> None:
        """Free the storage behind a forgotten entry."""

    def _payload_for_demotion(self, entry: _Entry) -> torch.Tensor:
        """The payload of an entry being evicted, valid during the on_evict callback."""
        return self.read(entry.meta)

    def _mark_read(self, meta: EntryMeta) -> None:
        with self._lock:
            entry = self._entries.get(meta.key)
            if entry is not None:
                entry.num_reads += 1
                self.policy.access(meta.key)
            self.stats.num_loaded_bytes += meta.num_bytes

    def _fail(self, meta: EntryMeta, reason: str) -> TierError:
        with self._lock:
            self.stats.num_errors += 1
            self._drop(meta.key)
        return TierError(f"{self.name} tier: {reason}")

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release resources (files, memory)."""

    def _check_capacity(self) -> None:
        assert self.used_bytes <= self.capacity_bytes, "capacity exceeded"

    def check_integrity(self) -> None:
        with self._lock:
            size = sum(self._entry_bytes(e.meta) for e in self._entries.values())
            assert size == self.used_bytes, f"used_bytes {self.used_bytes} != {size}"
            self._check_capacity()
            assert all(e.pins >= 0 for e in self._entries.values())
            assert all(n > 0 and k not in self._entries for k, n in self._orphan_pins.items())
            for block_hash, (key, index) in self._block_index.items():
                entry = self._entries.get(key)
                assert entry is not None, "index points at a missing entry"
                assert entry.meta.block_hashes[index] == block_hash
            for block_hash, holders in self._other_holders.items():
                assert holders and block_hash in self._block_index
                for key, index in holders:
                    assert self._entries[key].meta.block_hashes[index] == block_hash
            assert all(h in self._block_index for e in self._entries.values()
                       for h in e.meta.block_hashes), "a stored block cannot be found"
            assert len(self.policy) == sum(e.ready for e in self._entries.values()), \
                "policy and ready entries disagree"
