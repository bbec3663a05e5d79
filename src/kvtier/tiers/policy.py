"""Eviction policies for tier stores: which entry goes when a store is full.

A policy only orders keys; the store owns the data and decides what may be evicted (pinned
entries are skipped through `is_evictable`). Policies:

- `lru`: least recently used.
- `s3fifo`: S3-FIFO (Yang et al., SOSP'23), scan-resistant: new entries enter a small FIFO
  (~10% of entries); those read again before leaving it move to the main FIFO, the rest are
  evicted and remembered in a ghost FIFO, so a key that comes back soon goes straight to main.
  Main-FIFO entries with a nonzero frequency get reinserted (with frequency - 1) instead of
  being evicted. One-off scans thus never flush the reused working set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable

Key = Hashable


class EvictionPolicy(ABC):
    name = "base"

    @abstractmethod
    def insert(self, key: Key) -> None:
        """A new entry was stored."""

    @abstractmethod
    def access(self, key: Key) -> None:
        """An entry was read."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """An entry left the store (evicted, dropped or invalid)."""

    @abstractmethod
    def victim(self, is_evictable: Callable[[Key], bool]) -> Key | None:
        """The entry to evict next, or None when no evictable entry exists. Does not remove."""

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, is_evictable: Callable[[Key], bool]) -> Key | None:
        return next((k for k in self._order if is_evictable(k)), None)

    def __len__(self) -> int:
        return len(self._order)


class S3FIFOPolicy(EvictionPolicy):
    name = "s3fifo"
    _MAX_FREQ = 3

    def __init__(self, small_fraction: float = 0.1, ghost_size: int = 4096) -> None:
        self.small_fraction = small_fraction
        self.ghost_size = ghost_size
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}

    def insert(self, key: Key) -> None:
        if key in self._freq:  # already tracked: an access, not a second copy in a queue
            self.access(key)
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: Key) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, self._MAX_FREQ)

    def remove(self, key: Key) -> None:
        if self._freq.pop(key, None) is None:
            return
        if self._small.pop(key, 0) == 0:
            self._main.pop(key, None)

    def victim(self, is_evictable: Callable[[Key], bool]) -> Key | None:
        """Pick from the small FIFO while it is over its share, else from main; promotions
        and second chances happen here, so repeated calls make progress."""
        for _ in range(2 * len(self._freq) + 2):
            small_over = len(self._small) > self.small_fraction * max(len(self._freq), 1)
            queue = self._small if (small_over or not self._main) else self._main
            key = next((k for k in queue if is_evictable(k)), None)
            if key is None:
                other = self._main if queue is self._small else self._small
                key = next((k for k in other if is_evictable(k)), None)
                if key is None:
                    return None
                queue = other
            if queue is self._small and self._freq[key] > 0:
                del self._small[key]
                self._main[key] = None
                self._freq[key] = 0
                continue
            if queue is self._main and self._freq[key] > 0:
                self._main.move_to_end(key)
                self._freq[key] -= 1
                continue
            if queue is self._small:
                self._ghost[key] = None
                while len(self._ghost) > self.ghost_size:
                    self._ghost.popitem(last=False)
            return key
        return next((k for k in self._freq if is_evictable(k)), None)

    def __len__(self) -> int:
        return len(self._freq)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}


def create_policy(name: str) -> EvictionPolicy:
    if name == "arc":
        raise ValueError("eviction policy 'arc' is not implemented; use lru or s3fifo")
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose from "
                         f"{', '.join(POLICIES)}") from None
