"""Host-memory tier: one pre-allocated pool of fixed-size slots (pinned when the device is CUDA).

A slot holds one chunk (`chunk_blocks` blocks of all layers); a shorter trailing entry still
takes a whole slot, so capacity accounting is in slots and never exceeds the configured bytes.
Allocating once avoids per-entry pinned allocations (slow, and leak-prone in other engines).
"""

from __future__ import annotations

import torch

from kvtier.config import ConfigError
from kvtier.runner.memory import available_bytes
from kvtier.tiers.base import EntryMeta, KVLayout, StoreHandle, TierError, TierStore, _Entry
from kvtier.tiers.policy import EvictionPolicy


class CPUStore(TierStore):
    name = "cpu"

    def __init__(self, layout: KVLayout, capacity_bytes: int, policy: EvictionPolicy,
                 chunk_blocks: int, pin_memory: bool) -> None:
        self.slot_bytes = chunk_blocks * layout.block_bytes
        num_slots = capacity_bytes // self.slot_bytes
        super().__init__(layout, num_slots * self.slot_bytes, policy)
        if num_slots < 1:
            raise ValueError(f"cpu tier of {capacity_bytes} bytes cannot hold one chunk of "
                             f"{self.slot_bytes} bytes")
        # Refused as the KV pool is: allocating more than the host has ended the start in an
        # allocator's traceback or, where the kernel overcommits, in the OOM killer later.
        free = available_bytes(torch.device("cpu"))
        if free is not None and self.capacity_bytes > free:
            raise ConfigError(f"cpu tier of {capacity_bytes} bytes: more than the "
                              f"{free / 1024**3:.1f} GiB of host memory free")
        self.num_slots = num_slots
        self.pool = torch.empty((num_slots, self.slot_bytes), dtype=torch.uint8,
                                pin_memory=pin_memory)
        self._free_slots = list(range(num_slots - 1, -1, -1))

    def _entry_bytes(self, meta: EntryMeta) -> int:
        return self.slot_bytes

    def _has_room(self, meta: EntryMeta) -> bool:
        return bool(self._free_slots)

    def prepare_store(self, meta: EntryMeta) -> StoreHandle | None:
        if meta.num_bytes > self.slot_bytes:
            raise ValueError(f"entry of {meta.num_bytes} bytes exceeds the slot size")
        with self._lock:
            if meta.key in self._entries:
                return None
            if not self._reserve(meta, None):
                self.stats.num_rejected += 1
                return None
            slot = self._free_slots.pop()
            self._entries[meta.key].location = slot
            return StoreHandle(meta, self.pool[slot, :meta.num_bytes], slot)

    def complete_store(self, handle: StoreHandle, success: bool) -> None:
        with self._lock:
            self._finish_store(handle.meta, success)

    def read(self, meta: EntryMeta) -> torch.Tensor:
        with self._lock:
            entry = self._entries.get(meta.key)
            if entry is None or not entry.ready:
                raise TierError(f"cpu tier: entry {meta.key.hex()} is gone")
            slot = entry.location
        self._mark_read(meta)
        assert isinstance(slot, int)
        return self.pool[slot, :meta.num_bytes]

    def _payload_for_demotion(self, entry: _Entry) -> torch.Tensor:
        assert isinstance(entry.location, int)
        return self.pool[entry.location, :entry.meta.num_bytes]

    def _release(self, entry: _Entry) -> None:
        if isinstance(entry.location, int):
            self._free_slots.append(entry.location)

    def check_integrity(self) -> None:
        super().check_integrity()
        with self._lock:
            used = {e.location for e in self._entries.values() if e.location is not None}
            assert not used & set(self._free_slots), "slot both used and free"
            assert len(used) + len(self._free_slots) == self.num_slots, "slot leaked"
