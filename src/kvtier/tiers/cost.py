"""Load-or-recompute: predicted load time (latency + bytes over the tier's measured rate) against
predicted recompute time (tokens over the measured prefill rate).

Rates start from a short probe at engine start and follow what the engine observes
(exponentially weighted), so a slow disk or a busy link stops being used on its own.

A tier judged too slow is still tried once every `RETRY_AFTER_S`: its rate is only measured
by loads, so without a retry one bad estimate (a stall, a busy link) would shut it out for
the rest of the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TierRate:
    bytes_per_s: float
    latency_s: float = 0.0


class CostModel:
    SMOOTHING = 0.2
    RETRY_AFTER_S = 1.0

    def __init__(self, prefill_tokens_per_s: float, tier_rates: dict[str, TierRate],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if prefill_tokens_per_s <= 0:
            raise ValueError("prefill rate must be positive")
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.tier_rates = dict(tier_rates)
        self._clock = clock
        self._last_tried = {tier: clock() for tier in tier_rates}
        """When each tier was last measured, or last granted a retry."""
        self._lock = threading.Lock()

    def recompute_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def load_s(self, tier: str, num_bytes: int) -> float:
        rate = self.tier_rates[tier]
        return rate.latency_s + num_bytes / rate.bytes_per_s

    def load_pays(self, tier: str, num_bytes: int, num_tokens: int) -> bool:
        return self.load_s(tier, num_bytes) < self.recompute_s(num_tokens)

    def grant_retry(self, tier: str) -> bool:
        """For a load `load_pays` refused: True at most once per `RETRY_AFTER_S` without a
        measurement of this tier, so the load runs and measures the tier again."""
        now = self._clock()
        with self._lock:
            if now - self._last_tried.get(tier, now) < self.RETRY_AFTER_S:
                return False
            self._last_tried[tier] = now
        return True

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """A step that computed `num_tokens` prompt tokens (mostly prefill) took `seconds`."""
        if num_tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            rate = num_tokens / seconds
            self.prefill_tokens_per_s += self.SMOOTHING * (rate - self.prefill_tokens_per_s)

    def observe_load(self, tier: str, num_bytes: int, seconds: float) -> None:
        """A load of `num_bytes` from `tier` took `seconds` of transfer (not of waiting to be
        noticed: that would read a fast link as slow whenever steps are long)."""
        if num_bytes <= 0 or seconds <= 0 or tier not in self.tier_rates:
            return
        with self._lock:
            self._last_tried[tier] = self._clock()
            current = self.tier_rates[tier]
            # A load quicker than the latency estimate shows that estimate is too high, and
            # says little of the bandwidth: read at most twice the naive rate from it, not
            # the near-infinite one a near-zero remainder would give.
            current.latency_s = min(current.latency_s, seconds)
            measured = num_bytes / max(seconds - current.latency_s, seconds / 2)
            current.bytes_per_s += self.SMOOTHING * (measured - current.bytes_per_s)
