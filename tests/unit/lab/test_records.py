"""records.py and server_stats.py: what a run keeps, JSON/CSV files, kvtier counters."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kvtier.lab.records import (
    SERVER_FAILED,
    RunRecord,
    combine_repeats,
    read_results_json,
    write_results_csv,
    write_results_json,
)
from kvtier.lab.server_stats import KvtierRunStats, format_stats, split_key, summarize
from tests.unit.lab.helpers import kvtier_stats, record


def test_from_result_keeps_successful_latencies_and_errors():
    r = record("off", "P", [0.1, 0.2], failed=1)
    assert r.ttfts_ms == pytest.approx([100.0, 200.0])
    assert r.itls_ms == pytest.approx([10.0] * 6)
    assert r.result["completed"] == 2 and r.result["failed"] == 1
    assert "ttfts" not in r.result  # per-request arrays stay out of results.json
    assert "HTTP 500" in r.error and r.succeeded
    assert r.metric("mean_ttft_ms") == pytest.approx(150.0)
    assert r.metric("nonexistent") is None


def test_tokens_per_chunk_shows_merged_stream_chunks():
    """Two streams of 9 tokens: one token per chunk, and one whose last 8 tokens came in 2
    chunks (a front end behind its engine): (18 - 2) tokens over 8 + 2 gaps."""
    from kvtier.bench.metrics import RequestFuncOutput, compute_result
    streams = [RequestFuncOutput(success=True, prompt_len=10, output_tokens=9, start_time=0.0,
                                 ttft=0.1, itl=[0.01] * 8, latency=0.18),
               RequestFuncOutput(success=True, prompt_len=10, output_tokens=9, start_time=0.0,
                                 ttft=0.1, itl=[0.04, 0.04], latency=0.18)]
    r = RunRecord.from_result("a", "S", compute_result(streams, 1.0))
    assert r.metric("output_tokens_per_chunk") == pytest.approx(16 / 10)
    single = RunRecord.from_result("a", "S", compute_result(streams[:1], 1.0))
    assert single.metric("output_tokens_per_chunk") == pytest.approx(1.0)


def test_results_json_is_strict_and_reads_back(tmp_path: Path):
    good = record("off", "P", [0.1], kvtier=kvtier_stats(100, 50, 25))
    bad = RunRecord("on", "P", status=SERVER_FAILED, error="exited with code 1")
    path = tmp_path / "results.json"
    write_results_json(path, {"name": "x", "workloads": [{"request_rate": float("inf")}]},
                       [good, bad])
    text = path.read_text()
    assert "Infinity" not in text
    data = json.loads(text)
    assert data["experiment"]["workloads"][0]["request_rate"] == "inf"
    assert data["machine"]["cpu_count"] >= 1
    back = read_results_json(path)
    assert [r.status for r in back] == ["ok", SERVER_FAILED]
    assert back[0].kvtier == good.kvtier and back[0].ttfts_ms == good.ttfts_ms


def test_csv_has_one_row_per_run_with_tier_columns(tmp_path: Path):
    records = [record("off", "P", [0.1], kvtier=kvtier_stats(100, 50, 0), device_kv_tokens=512,
                      prefix_working_set_tokens=2048),
               record("on", "P", [0.1], kvtier=kvtier_stats(100, 50, 25), device_kv_tokens=512),
               RunRecord("on", "S", status=SERVER_FAILED, error="boom")]
    records[0].kvtier["tier_hit_tokens"].pop("cpu")  # type: ignore[index]
    path = tmp_path / "results.csv"
    write_results_csv(path, records)
    rows = list(csv.DictReader(path.open()))
    assert [(r["server"], r["workload"], r["status"]) for r in rows] == [
        ("off", "P", "ok"), ("on", "P", "ok"), ("on", "S", SERVER_FAILED)]
    assert rows[0]["hit_tokens_device"] == "50" and rows[0]["hit_tokens_cpu"] == ""
    assert rows[1]["hit_tokens_cpu"] == "25" and rows[0]["device_kv_tokens"] == "512"
    assert rows[0]["prefix_working_set_tokens"] == "2048"
    assert float(rows[0]["mean_ttft_ms"]) == pytest.approx(100.0)
    assert rows[2]["error"] == "boom" and rows[2]["mean_ttft_ms"] == ""


DIFF = {
    "kvtier:prompt_tokens_total": 1000.0, "kvtier:generation_tokens_total": 64.0,
    "kvtier:prefix_cache_hits_total": 700.0, "kvtier:num_preemptions_total": 2.0,
    "kvtier:engine_steps_total": 41.0, "kvtier:engine_decode_only_steps_total": 35.0,
    "kvtier:engine_prompt_steps_total": 5.0, "kvtier:engine_prompt_step_seconds_total": 0.2,
    "kvtier:engine_decode_only_step_seconds_total": 0.1,
    'kvtier:tier_hit_tokens_total{tier="cpu"}': 400.0,
    'kvtier:tier_hit_tokens_total{tier="disk"}': 100.0,
    'kvtier:tier_loaded_bytes_total{tier="cpu"}': 2.0 * 2**20,
    'kvtier:tier_stored_bytes_total{tier="cpu"}': 3.0 * 2**20,
    'kvtier:request_success_total{finished_reason="length"}': 8.0,
    'kvtier:request_success_total{finished_reason="stop"}': 0.0,
    "kvtier:time_to_first_token_seconds_count": 8.0,
    "kvtier:time_to_first_token_seconds_sum": 0.4,
    "kvtier:request_queue_time_seconds_sum": 0.1,
    "kvtier:request_prefill_time_seconds_sum": 0.2,
    "kvtier:request_tokenize_time_seconds_sum": 0.05,
    "kvtier:request_tokenize_time_seconds_count": 10.0,  # two aborted before a first token
}


def test_summarize_splits_matched_tokens_by_tier():
    stats = summarize(DIFF)
    assert stats is not None
    assert stats.tier_hit_tokens == {"device": 200, "cpu": 400, "disk": 100}
    assert (stats.prompt_tokens, stats.matched_tokens, stats.computed_tokens) == (1000, 700, 300)
    assert stats.num_requests == 8 and stats.num_preemptions == 2 and stats.num_steps == 41
    assert stats.tier_loaded_bytes == {"cpu": 2 * 2**20}
    # Latency sums are seconds (not rounded like the counters), averaged per first token.
    assert stats.mean_server_ttft_ms == pytest.approx(50.0)
    assert stats.mean_queue_time_ms == pytest.approx(12.5)
    assert stats.mean_prefill_time_ms == pytest.approx(25.0)
    assert stats.mean_front_end_ms == pytest.approx(12.5)  # 50 - 12.5 - 25
    assert stats.mean_tokenize_ms == pytest.approx(5.0)  # over the requests it timed
    assert stats.to_json()["mean_tokenize_ms"] == pytest.approx(5.0)
    # 5 steps carried prompt tokens, in 0.2 s; 35 decode-only steps in 0.1 s (one ran
    # nothing).
    assert stats.num_prompt_steps == 5 and stats.num_decode_only_steps == 35
    assert stats.mean_prompt_step_ms == pytest.approx(40.0)
    assert stats.mean_decode_step_ms == pytest.approx(100 / 35)
    assert stats.to_json()["mean_prompt_step_ms"] == pytest.approx(40.0)
    assert KvtierRunStats().mean_prompt_step_ms is None  # no steps: no mean
    assert stats.to_json()["mean_queue_time_ms"] == pytest.approx(12.5)
    text = format_stats(stats, client_prompt_tokens=1000)
    assert "700 (70.0%)" in text and "hit tokens, cpu:" in text and "2.0 / 3.0" in text
    assert summarize({"vllm:prompt_tokens_total": 5.0}) is None
    assert summarize(None) is None


def labelled(diff: dict[str, float], model: str) -> dict[str, float]:
    """`diff` as a kvtier server scrapes it: every series labelled with its model_name
    (first, as bench.prometheus sorts the labels)."""
    out = {}
    for key, value in diff.items():
        name, labels = split_key(key)
        inner = ",".join(f'{k}="{v}"' for k, v in sorted({**labels, "model_name": model}.items()))
        out[f"{name}{{{inner}}}"] = value
    return out


def test_summarize_sums_over_the_model_name_label():
    """kvtier labels every series with model_name, as vLLM does: the summary is the same as
    without it, and series of two model names add up."""
    plain = summarize(DIFF)
    assert plain is not None
    assert summarize(labelled(DIFF, "tiny")) == plain
    both = summarize({**labelled(DIFF, "a"), **labelled(DIFF, "b")})
    assert both is not None
    assert (both.prompt_tokens, both.matched_tokens, both.num_requests) == (2000, 1400, 16)
    assert both.tier_hit_tokens == {"device": 400, "cpu": 800, "disk": 200}
    assert both.ttft_s == pytest.approx(0.8)


def test_split_key_reads_labels():
    assert split_key('a{tier="cpu",x="1"}') == ("a", {"tier": "cpu", "x": "1"})
    assert split_key("plain") == ("plain", {})


def test_repeated_runs_combine_into_medians_with_pooled_latencies_and_their_spread():
    runs = [record("on", "P", [1.0, 1.0], duration_s=10.0),   # 0.2 req/s, TTFT 1000 ms
            record("on", "P", [3.0, 3.0], duration_s=5.0),    # 0.4 req/s, TTFT 3000 ms
            record("on", "P", [2.0, 2.0], duration_s=4.0),    # 0.5 req/s, TTFT 2000 ms
            record("on", "P", [9.0], duration_s=1.0, failed=1),
            record("off", "P", [5.0], duration_s=10.0)]
    runs[3].status = "failed"
    combined = combine_repeats(runs)
    assert [(r.server, r.workload) for r in combined] == [("on", "P"), ("off", "P")]
    on, off = combined
    assert off is runs[4]  # a single run passes through unchanged
    assert on.metric("request_throughput") == pytest.approx(0.4)
    assert on.metric("mean_ttft_ms") == pytest.approx(2000.0)  # median of 1000, 3000, 2000
    assert on.result["mean_ttft_ms_runs"] == pytest.approx([1000.0, 3000.0, 2000.0])
    assert len(on.ttfts_ms) == 6 and 9000.0 not in on.ttfts_ms  # the failed run is left out
    assert on.repeat == -1 and combine_repeats([on]) == [on]
