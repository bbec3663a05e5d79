"""Load-or-recompute: the cost model follows observed rates, and a tier it judged too slow gets
re-measured instead of being shut out for good."""

from __future__ import annotations

import pytest

from kvtier.tiers.cost import CostModel, TierRate

MB = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def model(clock: FakeClock, gb_per_s: float = 50.0) -> CostModel:
    # 100k prompt tokens/s: recomputing 4,096 tokens takes 41 ms.
    return CostModel(100_000.0, {"cpu": TierRate(gb_per_s * 1e9)}, clock=clock)


def test_load_pays_when_the_copy_is_faster_than_the_prefill() -> None:
    cost = model(FakeClock())
    assert cost.load_pays("cpu", 117 * MB, 4096)       # 2.3 ms against 41 ms
    assert not cost.load_pays("cpu", 117 * MB, 16)     # 2.3 ms against 0.16 ms


def test_slow_observations_turn_loads_off() -> None:
    cost = model(FakeClock())
    for _ in range(30):
        cost.observe_load("cpu", 117 * MB, 0.5)        # 0.23 GB/s
    assert cost.tier_rates["cpu"].bytes_per_s < 1e9
    assert not cost.load_pays("cpu", 117 * MB, 4096)


def test_a_refused_tier_is_retried_once_per_interval() -> None:
    clock = FakeClock()
    cost = model(clock, gb_per_s=0.1)                  # 1.2 s per 117 MB: never pays
    assert not cost.load_pays("cpu", 117 * MB, 4096)
    assert not cost.grant_retry("cpu")                 # measured (probed) just now
    clock.now += CostModel.RETRY_AFTER_S
    assert cost.grant_retry("cpu")
    assert not cost.grant_retry("cpu")                 # one retry per interval
    clock.now += CostModel.RETRY_AFTER_S / 2
    assert not cost.grant_retry("cpu")
    clock.now += CostModel.RETRY_AFTER_S / 2
    assert cost.grant_retry("cpu")


def test_a_retry_that_measures_a_fast_copy_turns_loads_back_on() -> None:
    clock = FakeClock()
    cost = model(clock, gb_per_s=0.1)
    clock.now += CostModel.RETRY_AFTER_S
    assert cost.grant_retry("cpu")
    for _ in range(20):                                # the retried loads copy at 50 GB/s
        cost.observe_load("cpu", 117 * MB, 117 * MB / 50e9)
    assert cost.load_pays("cpu", 117 * MB, 4096)


def test_an_observation_postpones_the_next_retry() -> None:
    clock = FakeClock()
    cost = model(clock, gb_per_s=0.1)
    clock.now += 0.9 * CostModel.RETRY_AFTER_S
    cost.observe_load("cpu", 1 * MB, 0.01)
    clock.now += 0.5 * CostModel.RETRY_AFTER_S
    assert not cost.grant_retry("cpu")


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_observations_without_time_are_ignored(seconds: float) -> None:
    cost = model(FakeClock())
    cost.observe_load("cpu", 117 * MB, seconds)
    cost.observe_prefill(4096, seconds)
    assert cost.tier_rates["cpu"].bytes_per_s == 50e9
    assert cost.prefill_tokens_per_s == 100_000.0


def test_a_load_quicker_than_the_latency_estimate_reads_a_bounded_rate() -> None:
    """A 4 ms load from a disk whose probe said 5 ms of latency: the latency estimate drops
    to 4 ms and the rate moves toward at most twice the naive 1 GB/s. Before, it read as
    ~1e15 B/s, and 2-second loads then looked cheaper than a 0.1 s recompute for dozens of
    loads."""
    cost = CostModel(100_000.0, {"disk": TierRate(1e9, latency_s=0.005)}, clock=FakeClock())
    cost.observe_load("disk", 4 * MB, 0.004)
    rate = cost.tier_rates["disk"]
    assert rate.latency_s == 0.004
    assert 1e9 <= rate.bytes_per_s <= 2e9
    for _ in range(3):
        cost.observe_load("disk", 2000 * MB, 2.0)
    assert not cost.load_pays("disk", 2000 * MB, 10_000)  # 2 s against 0.1 s


def test_steps_no_longer_than_twice_the_fixed_cost_are_not_read_as_rates() -> None:
    """An H200-like engine: an almost empty step takes 15 ms of launching, and a 2,048-token
    step barely longer (its device work hidden behind the launches). Read as a rate, that
    step would pull the estimate to ~130k tokens/s from 170k; it is skipped, and steps long
    enough to be their compute's are read as they are. Without a fixed cost every step is
    read."""
    cost = CostModel(170_000.0, {}, clock=FakeClock(), step_overhead_s=0.015)
    cost.observe_prefill(2048, 0.016)
    assert cost.prefill_tokens_per_s == 170_000.0
    for _ in range(40):
        cost.observe_prefill(8192, 0.05)
    assert cost.prefill_tokens_per_s == pytest.approx(8192 / 0.05, rel=0.01)
    naive = CostModel(170_000.0, {}, clock=FakeClock())
    naive.observe_prefill(2048, 0.016)
    assert naive.prefill_tokens_per_s < 170_000.0
