"""Load-or-recompute: predicted load time (latency + bytes over the tier's measured rate) against
predicted recompute time (tokens over the measured prefill rate).

Rates start from a short probe at engine start and follow what the engine observes
(exponentially weighted), so a slow disk or a busy link stops being used on its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class TierRate:
    bytes_per_s: float
    latency_s: float = 0.0


class CostModel:
    SMOOTHING = 0.2

    def __init__(self, prefill_tokens_per_s: float, tier_rates: dict[str, TierRate]) -> None:
        if prefill_tokens_per_s <= 0:
            raise ValueError("prefill rate must be positive")
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.tier_rates = dict(tier_rates)
        self._lock = threading.Lock()

    def recompute_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def load_s(self, tier: str, num_bytes: int) -> float:
        rate = self.tier_rates[tier]
        return rate.latency_s + num_bytes / rate.bytes_per_s

    def load_pays(self, tier: str, num_bytes: int, num_tokens: int) -> bool:
        return self.load_s(tier, num_bytes) < self.recompute_s(num_tokens)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """A step that computed `num_tokens` prompt tokens (mostly prefill) took `seconds`."""
        if num_tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            rate = num_tokens / seconds
            self.prefill_tokens_per_s += self.SMOOTHING * (rate - self.prefill_tokens_per_s)

    def observe_load(self, tier: str, num_bytes: int, seconds: float) -> None:
        if num_bytes <= 0 or seconds <= 0 or tier not in self.tier_rates:
            return
        with self._lock:
            current = self.tier_rates[tier]
            measured = num_bytes / max(seconds - current.latency_s, 1e-9)
            current.bytes_per_s += self.SMOOTHING * (measured - current.bytes_per_s)
