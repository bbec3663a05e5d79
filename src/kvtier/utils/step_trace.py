"""Reading and summarising a KVTIER_STEP_TRACE file (the writer is `utils/profiling.py`).

A served run's p99 inter-token latency is made of the gaps a decoding stream sees between
two of its tokens. Averages over steps do not show those gaps; the trace does: every step's
completion time, its kind and how many of its rows were decodes. The gap in front of a step
that carries decodes is the time since the previous step that carried decodes, and each of
its decode rows waited that long (a row's first token after its prompt waited less, so the
figures are an upper bound for those rows). The summary weights each gap by those rows, as a
token-level ITL percentile does, and counts the prompt steps that ran inside each gap.

One file may hold several server lifetimes (a lab experiment with repeats appends to it);
`split_runs` cuts it where the engine was idle for longer than a run's pauses.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceStep:
    """One line of the trace."""

    t: float
    """When the step's tokens were read (`time.perf_counter`, seconds)."""
    kind: str
    """"prompt", "decode" or "empty" (`engine._step_kind`)."""
    rows: int
    tokens: int
    ms: float
    """Launch to tokens (under async scheduling: the step period)."""
    decodes: int
    """Rows that sampled one token from one input token: 0 for a line written before the
    field existed, except that a decode step's rows are all decodes."""
    loads: int = 0
    """With tiers: tier loads that finished since the previous line."""
    stores: int = 0
    """With tiers: chunk stores that started since the previous line."""


@dataclass(frozen=True)
class StepTraceSummary:
    """What one run's steps did to its decoding streams."""

    steps: dict[str, int]
    mean_ms: dict[str, float]
    decode_tokens: int
    gap_ms_p50: float
    gap_ms_p90: float
    gap_ms_p99: float
    gap_ms_max: float
    prompt_steps_in_gap: dict[int, int]
    """Steps with prompt tokens inside a gap (the gap's closing step included) -> decode
    tokens that waited through such a gap."""
    mean_gap_ms_by_prompt_steps: dict[int, float]
    tier_loads: int
    tier_stores: int
    mean_prompt_ms_with_stores: float
    """Mean step with prompt tokens among those whose line counted started stores (NaN when
    none did). Compare with care: lazy stores start when a long prefill evicts, so these are
    mostly the longer steps anyway (Q on an H200, BENCHMARKS.md)."""
    mean_prompt_ms_without_stores: float


def read_step_trace(path: str | Path) -> list[TraceStep]:
    """The steps of a trace file, in the order written. A malformed line raises ValueError
    naming its line number."""
    steps = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                kind = str(raw["kind"])
                rows = int(raw["rows"])
                decodes = int(raw.get("decodes", rows if kind == "decode" else 0))
                steps.append(TraceStep(float(raw["t"]), kind, rows, int(raw["tokens"]),
                                       float(raw["ms"]), decodes, int(raw.get("loads", 0)),
                                       int(raw.get("stores", 0))))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a step trace line ({exc})") from exc
    return steps


def split_runs(steps: Sequence[TraceStep], idle_s: float = 5.0) -> list[list[TraceStep]]:
    """Cut the trace where no step completed for longer than `idle_s` (a server restart, or
    the pause between a lab's runs)."""
    runs: list[list[TraceStep]] = []
    for step in steps:
        if not runs or step.t - runs[-1][-1].t > idle_s:
            runs.append([])
        runs[-1].append(step)
    return runs


def _weighted_percentile(values: Sequence[tuple[float, int]], fraction: float) -> float:
    """The smallest value v with at least `fraction` of the total weight at or below v."""
    ordered = sorted(values)
    total = sum(weight for _, weight in ordered)
    threshold, seen = fraction * total, 0
    for value, weight in ordered:
        seen += weight
        if seen >= threshold:
            return value
    return math.nan


def summarize(steps: Iterable[TraceStep]) -> StepTraceSummary:
    """Kinds, mean step times and the decode gaps of one run (module docstring)."""
    steps = list(steps)
    kinds = Counter(step.kind for step in steps)
    total_ms: Counter[str] = Counter()
    for step in steps:
        total_ms[step.kind] += step.ms
    gaps: list[tuple[float, int]] = []
    by_prompt_steps: Counter[int] = Counter()
    gap_ms_by_prompt_steps: Counter[int] = Counter()
    last_decode_t: float | None = None
    prompt_steps = 0
    for step in steps:
        # Steps with prompt tokens since the last decodes, this one included: a step that
        # mixes both made its decode rows wait for its prompt work too.
        prompt_steps += step.kind == "prompt"
        if not step.decodes:
            continue
        if last_decode_t is not None:
            gap_ms = 1e3 * (step.t - last_decode_t)
            gaps.append((gap_ms, step.decodes))
            by_prompt_steps[prompt_steps] += step.decodes
            gap_ms_by_prompt_steps[prompt_steps] += gap_ms * step.decodes
        last_decode_t, prompt_steps = step.t, 0
    percentile = (lambda f: _weighted_percentile(gaps, f)) if gaps else (lambda f: math.nan)
    prompt_ms = {True: [], False: []}
    for step in steps:
        if step.kind == "prompt":
            prompt_ms[step.stores > 0].append(step.ms)
    return StepTraceSummary(
        steps=dict(kinds),
        mean_ms={kind: total_ms[kind] / count for kind, count in kinds.items()},
        decode_tokens=sum(weight for _, weight in gaps),
        gap_ms_p50=percentile(0.5), gap_ms_p90=percentile(0.9), gap_ms_p99=percentile(0.99),
        gap_ms_max=max((gap for gap, _ in gaps), default=math.nan),
        prompt_steps_in_gap=dict(sorted(by_prompt_steps.items())),
        mean_gap_ms_by_prompt_steps={k: gap_ms_by_prompt_steps[k] / by_prompt_steps[k]
                                     for k in sorted(by_prompt_steps)},
        tier_loads=sum(step.loads for step in steps),
        tier_stores=sum(step.stores for step in steps),
        mean_prompt_ms_with_stores=_mean(prompt_ms[True]),
        mean_prompt_ms_without_stores=_mean(prompt_ms[False]))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
