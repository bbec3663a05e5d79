"""The engine's start-up prefill probe: the rate of a large step (as the rate of tokens at
position 0, attending nothing), an almost empty step's time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvtier.engine.engine import LLMEngine
from kvtier.tiers.cost import attention_per_key

# Qwen2.5-1.5B's shape.
SPEC = SimpleNamespace(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960,
                       num_attention_heads=12, num_key_value_heads=2, head_dim=128)
PER_KEY = attention_per_key(28, 1536, 8960, 12, 2, 128)


def at_position_0(num_tokens: int) -> float:
    """A step of `num_tokens` prompt tokens from position 0, in tokens at position 0."""
    return num_tokens * (1 + PER_KEY * (num_tokens - 1) / 2)


class TimedRunner:
    """A runner whose steps take `overhead_s` plus their tokens at `tokens_per_s` (on a fake
    clock), so the probe's arithmetic is checked without timing real forwards."""

    def __init__(self, clock: list[float], overhead_s: float, tokens_per_s: float) -> None:
        self.clock, self.overhead_s, self.tokens_per_s = clock, overhead_s, tokens_per_s
        self.sampler = SimpleNamespace(forget=lambda ids: None)
        self.steps: list[int] = []

    def execute(self, step) -> None:  # noqa: ANN001
        self.steps.append(step.num_scheduled_tokens)
        self.clock[0] += self.overhead_s + step.num_scheduled_tokens / self.tokens_per_s


def probe(monkeypatch: pytest.MonkeyPatch, device: str, budget: int, overhead_s: float,
          tokens_per_s: float) -> tuple[object, list[int]]:
    clock = [0.0]
    monkeypatch.setattr("kvtier.engine.engine.time.perf_counter", lambda: clock[0])
    runner = TimedRunner(clock, overhead_s, tokens_per_s)
    engine = SimpleNamespace(
        config=SimpleNamespace(cache=SimpleNamespace(block_size=16),
                               scheduler=SimpleNamespace(max_num_batched_tokens=budget)),
        pool=SimpleNamespace(num_blocks=4096), device=torch.device(device), runner=runner,
        spec=SPEC)
    if device == "cuda":
        monkeypatch.setattr("kvtier.engine.engine.torch.cuda.synchronize", lambda device: None)
    return LLMEngine._probe_prefill_rate(engine), runner.steps  # type: ignore[arg-type]


def test_the_probe_reads_the_rate_from_its_largest_step_and_times_an_empty_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An H200-like engine: 15 ms a step, 170k tokens/s of compute on top.
    rate, steps = probe(monkeypatch, "cuda", 8192, 0.015, 170_000)
    assert steps == [256, 256, 8192, 8192]
    assert rate.tokens_per_s == pytest.approx(at_position_0(8192) / (0.015 + 8192 / 170_000))
    assert rate.step_overhead_s == pytest.approx(0.015 + 256 / 170_000)
    assert rate.attention_per_key == PER_KEY
    # A smaller token budget caps both steps.
    rate, steps = probe(monkeypatch, "cuda", 1024, 0.015, 170_000)
    assert steps == [128, 128, 1024, 1024]


def test_the_cpu_probes_short_steps_and_one_size_where_the_budget_allows_no_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rate, steps = probe(monkeypatch, "cpu", 8192, 0.002, 800)
    assert steps == [32, 32, 256, 256]
    assert rate.tokens_per_s == pytest.approx(at_position_0(256) / (0.002 + 256 / 800))
    rate, steps = probe(monkeypatch, "cpu", 1, 0.002, 800)
    assert steps == [1, 1, 1, 1] and rate.step_overhead_s == 0.0
    assert rate.tokens_per_s == pytest.approx(at_position_0(1) / (0.002 + 1 / 800))
