"""The step-trace summary: decode gaps weighted by the decode rows that waited through them,
and the prompt steps inside each gap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvtier.utils.step_trace import TraceStep, read_step_trace, split_runs, summarize


def _step(t: float, kind: str, rows: int, decodes: int, ms: float = 1.0) -> TraceStep:
    return TraceStep(t, kind, rows, rows, ms, decodes)


def test_gaps_are_weighted_by_decode_rows_and_count_the_prompt_steps_inside() -> None:
    steps = [
        _step(0.000, "decode", 4, 4),
        _step(0.010, "decode", 4, 4),    # 10 ms gap, 4 tokens, no prompt step
        _step(0.040, "prompt", 2, 0),    # pure prompt steps: no decode token here
        _step(0.070, "prompt", 2, 0),
        _step(0.080, "decode", 2, 2),    # 70 ms gap over two prompt steps, 2 tokens
        _step(0.100, "prompt", 3, 1),    # mixed: 20 ms gap, its own prompt work in it
        _step(0.101, "empty", 0, 0),
    ]
    summary = summarize(steps)
    assert summary.steps == {"decode": 3, "prompt": 3, "empty": 1}
    assert summary.decode_tokens == 4 + 2 + 1
    assert summary.prompt_steps_in_gap == {0: 4, 2: 2, 1: 1}
    assert summary.mean_gap_ms_by_prompt_steps[2] == pytest.approx(70.0)
    assert summary.mean_gap_ms_by_prompt_steps[1] == pytest.approx(20.0)
    # 7 tokens: four at 10 ms, one at 20, two at 70. The median is 10, p90 and p99 are 70.
    assert summary.gap_ms_p50 == pytest.approx(10.0)
    assert summary.gap_ms_p90 == pytest.approx(70.0)
    assert summary.gap_ms_p99 == pytest.approx(70.0)
    assert summary.gap_ms_max == pytest.approx(70.0)


def test_a_run_without_two_decode_steps_has_no_gaps() -> None:
    summary = summarize([_step(0.0, "prompt", 1, 0), _step(0.05, "decode", 1, 1)])
    assert summary.decode_tokens == 0 and math.isnan(summary.gap_ms_p99)


def test_split_runs_cuts_at_idle_pauses() -> None:
    steps = [_step(t, "decode", 1, 1) for t in (0.0, 0.1, 0.2, 9.0, 9.1, 30.0)]
    assert [len(run) for run in split_runs(steps, idle_s=5.0)] == [3, 2, 1]


def test_read_step_trace_fills_decodes_for_old_lines_and_names_a_bad_line(
        tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join([
        json.dumps({"t": 1.0, "kind": "decode", "rows": 3, "tokens": 3, "ms": 2.0}),
        json.dumps({"t": 1.1, "kind": "prompt", "rows": 2, "decodes": 1, "tokens": 90,
                    "ms": 9.0}),
        json.dumps({"t": 1.2, "kind": "prompt", "rows": 2, "tokens": 90, "ms": 9.0}),
    ]) + "\n")
    steps = read_step_trace(path)
    assert [s.decodes for s in steps] == [3, 1, 0]
    path.write_text(path.read_text() + '{"t": 2.0, "kind": "decode"}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:4: not a step trace line"):
        read_step_trace(path)


def test_prompt_steps_are_split_by_whether_stores_started_around_them() -> None:
    steps = [TraceStep(0.00, "prompt", 1, 900, 30.0, 0, stores=2),
             TraceStep(0.03, "prompt", 1, 900, 20.0, 0, loads=1),
             TraceStep(0.05, "prompt", 1, 900, 26.0, 0, stores=1),
             TraceStep(0.06, "decode", 2, 2, 4.0, 2, stores=5)]  # not a prompt step
    summary = summarize(steps)
    assert (summary.tier_loads, summary.tier_stores) == (1, 8)
    assert summary.mean_prompt_ms_with_stores == pytest.approx(28.0)
    assert summary.mean_prompt_ms_without_stores == pytest.approx(20.0)
