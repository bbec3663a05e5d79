"""What the tier manager hands the scheduler: load plans, load results, and its counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.tiers.base import EntryMeta


@dataclass(frozen=True)
class Segment:
    """Consecutive blocks served by one entry of one tier."""

    tier: int
    meta: EntryMeta
    first: int
    """Index of the first needed block inside the entry."""
    num_blocks: int


@dataclass(frozen=True)
class LoadPlan:
    segments: tuple[Segment, ...]

    @property
    def num_blocks(self) -> int:
        return sum(s.num_blocks for s in self.segments)


@dataclass
class LoadResult:
    request_id: str
    num_loaded_blocks: int
    """Blocks from the start of the plan that are valid now (fewer after a tier error)."""
    hit_blocks_per_tier: dict[str, int]
    seconds: float


@dataclass
class ManagerStats:
    num_loads: int = 0
    load_seconds: float = 0.0
    """From a load's start until the scheduler saw it finish."""
    load_copy_seconds: float = 0.0
    """CUDA: the copies' own time on the load stream (from timing events)."""
    num_rejected_min_hits: int = 0
    """Chunks not stored because their prefix was seen fewer than kv_store_min_hits times."""
    num_rejected_cost: int = 0
    """Chunks not stored, or hits not loaded, because recomputing was predicted cheaper."""
    num_evicted_unsaved_blocks: int = 0
    """Device blocks evicted with no copy in any tier."""
    num_stores_started: int = 0
    """Chunks whose copy down to the first tier began (their gather is queued)."""
    num_stores_at_eviction: int = 0
    """Lazy-store chunks copied down at their eviction: the lookahead had not reached them."""
    reuse_rate: float = 0.0
    """Share of the recently noted prompt blocks that an earlier request had contained."""
    store_min_hits: int = 1
    """Requests that must contain a chunk before it is stored (`auto` moves it)."""
    hit_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens loaded from each tier, reloads of preempted requests included (the engine's
    `num_tier_hit_tokens` counts prompt tokens served, once per request)."""
