"""Load-or-recompute: predicted load time (latency + bytes over the tier's measured rate) against
predicted recompute time (tokens over the measured prefill rate, each weighted by the keys it
attends).

A prompt token at position p costs its projections plus attention over p keys: relative to
the projections alone, 1 + attention_per_key * p, where `attention_per_key` is the model's
FLOPs per attended key over its projections' FLOPs per token (1/15,200 for Qwen2.5-1.5B). The
measured rate is kept as that of tokens at position 0, so one rate predicts a short prompt
and the end of a 16k-token one (on an H200 a 16k-token prompt recomputed at ~110k tokens/s,
against ~170k in the start-up probe's 8,192-token step). FLOPs leave out that attention runs
at a lower rate than the projections, so a long prefix's recompute is estimated low, never
high: a load judged to pay does.

Rates start from a short probe at engine start and follow what the engine observes
(exponentially weighted), so a slow disk or a busy link stops being used on its own.

A tier judged too slow is still tried once every `RETRY_AFTER_S`: its rate is only measured
by loads, so without a retry one bad estimate (a stall, a busy link) would shut it out for
the rest of the run.

The prefill rate is read from steps whose time is their compute's. On CUDA a step's time is
the host's launching until its tokens' device work outlasts that (on an H200, a 1.5B
model's 2,048-token step took 1 ms longer than its 256-token one), so a short step says little
of what its tokens cost, and the tokens a load keeps out of a step that runs anyway cost only
their compute. Steps no longer than twice the fixed cost (an almost empty step's time, from
the start-up probe) are not observed. Read from them, the rate was ~16k tokens/s against
~170k in 8,192-token steps, and a Redis tier's 8 ms chunk loads looked cheaper than the
1.5 ms of compute they replaced.
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
    """The engine's start-up prefill probe: tokens per second at position 0 (from a large
    step), an almost empty step's time, and the model's `attention_per_key`."""

    tokens_per_s: float
    step_overhead_s: float = 0.0
    attention_per_key: float = 0.0


def attention_per_key(num_layers: int, hidden_size: int, intermediate_size: int,
                      num_heads: int, num_kv_heads: int, head_dim: int) -> float:
    """FLOPs of attending one more key (scores and values, every query head of every layer)
    over FLOPs of a token's projections (q, k, v, o and a gated MLP)."""
    projections = num_layers * (hidden_size * (num_heads + 2 * num_kv_heads) * head_dim
                                + num_heads * head_dim * hidden_size
                                + 3 * hidden_size * intermediate_size)
    return (4 * num_layers * num_heads * head_dim) / (2 * projections)


def token_weight(attention_per_key: float, first_token: int, num_tokens: int) -> float:
    """Prompt tokens at positions first_token .. first_token + num_tokens - 1, counted in
    tokens at position 0."""
    return num_tokens * (1.0 + attention_per_key * (first_token + (num_tokens - 1) / 2))


class CostModel:
    SMOOTHING = 0.2
    RETRY_AFTER_S = 1.0

    def __init__(self, prefill_tokens_per_s: float, tier_rates: dict[str, TierRate],
                 clock: Callable[[], float] = time.monotonic,
                 step_overhead_s: float = 0.0, attention_per_key: float = 0.0) -> None:
        if prefill_tokens_per_s <= 0:
            raise ValueError("prefill rate must be positive")
        self.prefill_tokens_per_s = prefill_tokens_per_s
        """Prompt tokens per second at position 0 (attending nothing)."""
        self.attention_per_key = max(0.0, attention_per_key)
        self.step_overhead_s = max(0.0, step_overhead_s)
        """An almost empty step's time (the start-up probe): steps up to twice as long are
        not read as rates."""
        self.tier_rates = dict(tier_rates)
        self._clock = clock
        self._last_tried = {tier: clock() for tier in tier_rates}
        """When each tier was last measured, or last granted a retry."""
        self._lock = threading.Lock()

    def recompute_s(self, num_tokens: int, first_token: int = 0) -> float:
        """Computing a prompt's tokens first_token .. first_token + num_tokens - 1."""
        return token_weight(self.attention_per_key, first_token, num_tokens) \
            / self.prefill_tokens_per_s

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

    def observe_prefill(self, num_tokens: int, seconds: float,
                        mean_position: float = 0.0) -> None:
        """A step that computed `num_tokens` prompt tokens (mostly prefill), at this mean
        position, took `seconds`."""
        if num_tokens <= 0 or seconds <= 0 or seconds <= 2 * self.step_overhead_s:
            return
        with self._lock:
            rate = num_tokens * (1.0 + self.attention_per_key * mean_position) / seconds
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
