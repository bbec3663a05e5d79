"""The engine's counters and gauges (`LLMEngine.get_stats`), as the engine core sends them to
the front ends for their logs and /metrics. Apart from the engine so that a front end reads
them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.tiers.base import TierStats
from kvtier.tiers.records import ManagerStats


@dataclass
class EngineStats:
    """Counters since start (monotonic) and gauges (now), for logs and /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_prefix_cache_queried_tokens: int = 0
    num_prefix_cache_hit_tokens: int = 0
    num_tier_hit_tokens: dict[str, int] = field(default_factory=dict)
    """Per lower tier: the part of num_prefix_cache_hit_tokens that tier served (counted at
    each request's first token, like the hits; reloads after a preemption are not hits)."""
    num_preemptions: int = 0
    num_finished: dict[str, int] = field(default_factory=dict)
    num_steps: int = 0
    num_decode_only_steps: int = 0
    """Steps whose every row is one sampled token (decodes)."""
    num_prompt_steps: int = 0
    """Steps with prompt tokens (prefill chunks, a hit's suffix), decodes or not beside them.
    The rest of num_steps ran nothing (every request waiting for a load or for blocks)."""
    decode_only_step_seconds: float = 0.0
    """Sum over decode-only steps of launch to tokens read (under async scheduling a step
    launched while the one before ran counts from that one's tokens: the step period)."""
    prompt_step_seconds: float = 0.0
    num_loading: int = 0
    tiers: dict[str, TierStats] = field(default_factory=dict)
    """Per lower tier (cpu, disk, ...): bytes stored/loaded, evictions, errors, ..."""
    tier_manager: ManagerStats | None = None
    """Hit tokens per tier, loads, admission rejections, device evictions without a copy."""
