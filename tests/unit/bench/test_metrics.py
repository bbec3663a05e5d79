"""metrics.py against hand-computed fixtures (BRIEF §4 definitions, vLLM's numbers)."""

from __future__ import annotations

import math

import pytest

from kvtier.bench.metrics import (
    BenchmarkResult,
    RequestFuncOutput,
    compute_result,
    count_good,
    format_summary,
    output_token_count,
    parse_goodput,
    stats_ms,
)


def recorded(start: float, chunk_times: list[float], **kwargs: object) -> RequestFuncOutput:
    """A successful request whose choice chunks arrived at `chunk_times` (absolute seconds)."""
    return RequestFuncOutput(
        success=True, start_time=start, ttft=chunk_times[0] - start,
        itl=[b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)],
        latency=chunk_times[-1] - start, **kwargs)  # type: ignore[arg-type]


def fixture_outputs() -> list[RequestFuncOutput]:
    """A: 4 chunks, usage 4. B: 2 chunks, no usage, text 'hello world' (2 Qwen tokens).
    C: one token. D: failed."""
    return [
        recorded(0.00, [0.10, 0.15, 0.25, 0.30], prompt_len=10, output_tokens=4),
        recorded(0.05, [0.25, 0.45], prompt_len=20, generated_text="hello world"),
        recorded(0.10, [0.20], prompt_len=5, output_tokens=1),
        RequestFuncOutput(success=False, prompt_len=7, start_time=0.2, error="HTTP 500"),
    ]


def test_counts_and_throughput(qwen):
    result = compute_result(fixture_outputs(), duration_s=1.0, tokenizer=qwen)
    assert (result.completed, result.failed) == (3, 1)
    assert result.total_input_tokens == 35  # the failed request's prompt is not counted
    assert result.per_request["output_lens"] == [4, 2, 1, 0]
    assert result.total_output_tokens == 7
    assert result.request_throughput == pytest.approx(3.0)
    assert result.output_throughput == pytest.approx(7.0)
    assert result.total_token_throughput == pytest.approx(42.0)
    half = compute_result(fixture_outputs(), duration_s=2.0, tokenizer=qwen)
    assert half.request_throughput == pytest.approx(1.5)
    assert half.duration == 2.0


def test_ttft_population_std_and_linear_percentile(qwen):
    r = compute_result(fixture_outputs(), 1.0, qwen)
    assert r.mean_ttft_ms == pytest.approx(400 / 3)
    assert r.median_ttft_ms == pytest.approx(100.0)
    assert r.std_ttft_ms == pytest.approx(math.sqrt(0.02 / 9) * 1000)  # population, ddof=0
    assert r.p99_ttft_ms == pytest.approx(198.0)  # 0.1 + 0.98 * (0.2 - 0.1), linear


def test_itl_is_pooled_per_chunk_not_averaged_per_request(qwen):
    r = compute_result(fixture_outputs(), 1.0, qwen)
    # pooled gaps: [0.05, 0.10, 0.05] from A and [0.20] from B
    assert r.mean_itl_ms == pytest.approx(100.0)  # per-request means would give 133.3
    assert r.median_itl_ms == pytest.approx(75.0)
    assert r.std_itl_ms == pytest.approx(math.sqrt(0.00375) * 1000)
    assert r.p99_itl_ms == pytest.approx(197.0)
    assert r.per_request["itls"][0] == pytest.approx([0.05, 0.10, 0.05])


def test_tpot_only_for_outputs_longer_than_one_token(qwen):
    r = compute_result(fixture_outputs(), 1.0, qwen)
    # A: (0.30 - 0.10) / 3; B: (0.40 - 0.20) / 1 with 2 tokenized tokens; C excluded
    assert r.mean_tpot_ms == pytest.approx((0.2 / 3 + 0.2) / 2 * 1000)
    assert r.p99_tpot_ms == pytest.approx((0.2 / 3 + 0.99 * (0.2 - 0.2 / 3)) * 1000)


def test_e2el_is_last_choice_chunk(qwen):
    r = compute_result(fixture_outputs(), 1.0, qwen)
    assert r.mean_e2el_ms == pytest.approx(800 / 3)
    assert r.median_e2el_ms == pytest.approx(300.0)


def test_output_tokens_fall_back_to_tokenizing_the_text(qwen):
    no_usage = RequestFuncOutput(success=True, generated_text="hello world")
    assert output_token_count(no_usage, qwen) == len(qwen.encode("hello world", False)) == 2
    zero_usage = RequestFuncOutput(success=True, output_tokens=0, generated_text="hello world")
    assert output_token_count(zero_usage, qwen) == 2  # vLLM: `if not output_len`
    assert output_token_count(RequestFuncOutput(success=True, output_tokens=9), qwen) == 9
    assert output_token_count(no_usage, None) == 1


def test_goodput_counts_requests_meeting_every_slo(qwen):
    r = compute_result(fixture_outputs(), 1.0, qwen, goodput={"ttft": 150, "tpot": 100})
    assert r.request_goodput == pytest.approx(2.0)  # A and C (one token: TPOT counts as 0)
    r = compute_result(fixture_outputs(), 2.0, qwen, goodput=parse_goodput("ttft:150 e2el:250"))
    assert r.request_goodput == pytest.approx(0.5)  # only C
    assert compute_result(fixture_outputs(), 1.0, qwen).request_goodput is None
    assert count_good({"ttft": [0.5]}, {"ttft": 500}) == 1  # the SLO bound is inclusive


def test_parse_goodput_rejects_bad_slos():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError):
        parse_goodput(["itl:10"])
    with pytest.raises(ValueError):
        parse_goodput(["ttft=10"])
    with pytest.raises(ValueError):
        parse_goodput({"ttft": -1})


def test_empty_metrics_report_zero_like_vllm():
    stats = stats_ms([], [99])
    assert stats == {"mean": 0.0, "median": 0.0, "std": 0.0, "percentiles": [(99.0, 0.0)]}
    r = compute_result([RequestFuncOutput(error="x")], 1.0)
    assert (r.completed, r.failed, r.mean_ttft_ms, r.max_concurrent_requests) == (0, 1, 0.0, 0)


def test_peak_rates(qwen):
    r = compute_result(fixture_outputs(), 1.0, qwen)
    assert r.max_output_tokens_per_s == 7.0  # every choice chunk lands in second 0
    assert r.max_concurrent_requests == 3  # all three in flight at t = 0.1


def test_json_uses_vllm_field_names(qwen):
    r = compute_result(fixture_outputs(), 1.0, qwen, percentiles=[50, 99.9])
    data = r.to_json()
    for key in ("completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "duration", "max_concurrency", "request_rate",
                "burstiness", "num_prompts", "input_lens", "output_lens", "ttfts", "itls",
                "generated_texts", "errors", "p50_ttft_ms", "p99.9_itl_ms"):
        assert key in data, key
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            assert f"{stat}_{metric}_ms" in data
    assert data["request_rate"] == "inf"
    assert "ttfts" not in r.to_json(detailed=False)


def test_multi_turn_ttft_by_turn():
    outs = [recorded(0.0, [0.4], turn_index=0), recorded(1.0, [1.1], turn_index=1),
            recorded(0.0, [0.2], turn_index=0)]
    r = compute_result(outs, 2.0)
    assert r.mean_ttft_ms_by_turn == pytest.approx([300.0, 100.0])


def test_summary_layout(qwen):
    r: BenchmarkResult = compute_result(fixture_outputs(), 1.0, qwen, goodput={"ttft": 150})
    r.max_concurrency = 4
    text = format_summary(r, ("ttft", "itl", "e2el"))
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[1] == f"{'Successful requests:':<40} {3:<10}"
    assert f"{'Maximum request concurrency:':<40} {4:<10}" in lines
    assert f"{'Request goodput (req/s):':<40} {2.0:<10.2f}" in lines  # A and C meet ttft:150
    assert "---------------Time to First Token----------------" in lines
    assert f"{'P99 ITL (ms):':<40} {197.0:<10.2f}" in lines
    assert "Time per Output Token" not in text
    assert lines[-1] == "=" * 50
    assert "Request rate configured" not in text  # rate inf is not printed
