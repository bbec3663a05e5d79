"""Load-or-recompute: predicted load time (latency + bytes over the tier's measured rate) against
predicted recompute time (tokens over the measured prefill rate).

The prefill rate is the marginal one: what computing N more prompt tokens adds to a step, not
a step's tokens over its time. A hit's load keeps tokens out of a step that runs anyway (for
the request's uncached suffix), so the step's fixed cost (launches, host work: ~15 ms of a
256-token step of a 1.5B model on an H200, whose 8,192-token steps run at ~170k tokens/s) is
not saved by a load. Counted in, it made a small step's 16k tokens/s the estimate, and a
Redis tier's 8 ms chunk loads looked cheaper than the 1.5 ms of compute they replaced.

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


@dataclass(frozen=True)
class PrefillRate:
    """The engine's start-up prefill probe: marginal tokens per second, and what a step costs
    beyond them."""

    tokens_per_s: float
    step_overhead_s: float = 0.0


class CostModel:
    SMOOTHING = 0.2
    RETRY_AFTER_S = 1.0

    def __init__(self, prefill_tokens_per_s: float, tier_rates: dict[str, TierRate],
                 clock: Callable[[], float] = time.monotonic,
                 step_overhead_s: float = 0.0) -> None:
        if prefill_tokens_per_s <= 0:
            raise ValueError("prefill rate must be positive")
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.step_overhead_s = max(0.0, step_overhead_s)
        """A prefill step's time beyond its tokens' marginal cost (from the start-up probe),
        taken off each observed step before it is read as a rate."""
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
            # At most twice the naive rate, as a load's latency is taken off in observe_load.
            rate = num_tokens / max(seconds - self.step_overhead_s, seconds / 2)
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
