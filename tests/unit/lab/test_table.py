"""table.py: the article's rows, units, and % change vs the first configuration."""

from __future__ import annotations

from kvtier.lab.records import FAILED
from kvtier.lab.table import (
    ARTICLE_ROWS,
    MISSING,
    STREAM_ROWS,
    comparison_grid,
    format_tables,
    format_value,
    merged_stream_lines,
    paired_lines,
    percent_change,
    render_markdown,
    render_text,
    tier_grid,
)
from tests.unit.lab.helpers import kvtier_stats, record


def test_values_print_like_the_article():
    assert format_value(924.29, "ms") == "924.29 ms"
    assert format_value(41350.0, "ms") == "41.35 s"
    assert format_value(34416.64, "rate") == "34,416.64"
    assert format_value(1813232, "count") == "1,813,232"
    assert format_value(None, "ms") == MISSING


def test_percent_change_signs_and_missing_base():
    assert percent_change(38.47, 41.35) == "−7.0%"
    assert percent_change(2.05, 2.05) == "+0.0%"
    assert percent_change(120.0, 100.0) == "+20.0%"
    assert percent_change(1.0, 0.0) == MISSING
    assert percent_change(None, 1.0) == MISSING


def test_comparison_grid_has_the_article_rows_and_changes():
    # base: TTFTs 1,2,3 s over 10 s; tier: 0.5,1,1.5 s -> mean TTFT halves.
    base = record("off", "P", [1.0, 2.0, 3.0])
    tier = record("on", "P", [0.5, 1.0, 1.5])
    grid = comparison_grid([base, tier], ["off", "on"])
    assert grid[0] == ["metric", "off", "on", "change"]
    assert [row[0] for row in grid[1:]] == [label for label, _, _ in ARTICLE_ROWS + STREAM_ROWS]
    rows = {row[0]: row[1:] for row in grid[1:]}
    assert rows["Output tokens per chunk"] == ["1.00", "1.00", "+0.0%"]  # one token each
    assert rows["Requests/sec"] == ["0.30", "0.30", "+0.0%"]
    assert rows["Mean TTFT"] == ["2.00 s", "1.00 s", "−50.0%"]
    assert rows["Median TTFT"][2] == "−50.0%"
    assert rows["Mean ITL"] == ["10.00 ms", "10.00 ms", "+0.0%"]


def test_three_configs_name_their_change_columns_and_failed_runs_show_dashes():
    base = record("a", "P", [1.0])
    broken = record("b", "P", [1.0])
    broken.status = FAILED
    grid = comparison_grid([base, broken, None], ["a", "b", "c"])
    assert grid[0][-2:] == ["b vs a", "c vs a"]
    assert grid[1][2:] == [MISSING, MISSING, MISSING, MISSING]


def test_tier_grid_lists_hit_tokens_per_tier():
    base = record("off", "P", [1.0], kvtier=kvtier_stats(1000, 200, 0))
    tier = record("on", "P", [1.0], kvtier=kvtier_stats(1000, 200, 600))
    base.kvtier["tier_hit_tokens"].pop("cpu")  # type: ignore[index]
    grid = tier_grid([base, tier], ["off", "on"])
    assert grid is not None
    rows = {row[0]: row[1:] for row in grid[1:]}
    assert rows["Matched, all caches"] == ["200", "800"]
    assert rows["  hit tokens: device"] == ["200", "200"]
    assert rows["  hit tokens: cpu"] == [MISSING, "600"]
    assert rows["Computed (prefilled)"] == ["800", "200"]
    assert rows["Engine steps"] == [MISSING, MISSING]  # runs from before the step counter
    # Runs recorded before the server's latency sums were summarised show dashes.
    assert rows["Server mean TTFT"] == [MISSING, MISSING]
    tier.kvtier.update(mean_server_ttft_ms=42.5, mean_queue_time_ms=7.25, num_steps=1234,  # type: ignore[union-attr]
                       num_prompt_steps=200, mean_prompt_step_ms=38.5, mean_decode_step_ms=4.25)
    rows = {row[0]: row[1:] for row in tier_grid([base, tier], ["off", "on"])[1:]}  # type: ignore[index]
    assert rows["Engine steps"] == [MISSING, "1,234"]
    assert rows["  with prompt tokens"] == [MISSING, "200"]
    assert rows["  mean step with prompt tokens"] == [MISSING, "38.50 ms"]
    assert rows["  mean decode-only step"] == [MISSING, "4.25 ms"]
    assert rows["Server mean TTFT"] == [MISSING, "42.50 ms"]
    assert rows["  queued in the engine core"] == [MISSING, "7.25 ms"]
    assert tier_grid([record("x", "P", [1.0])], ["x"]) is None


def test_renderers_align_text_and_emit_markdown():
    grid = [["metric", "a", "change"], ["Requests/sec", "1.00", "+5.0%"]]
    text = render_text(grid).splitlines()
    assert text[0] == "metric           a  change"
    assert text[1].startswith("------------")
    assert text[2] == "Requests/sec  1.00   +5.0%"
    assert render_markdown(grid).splitlines()[:2] == ["| metric | a | change |",
                                                      "|---|---:|---:|"]


def test_format_tables_covers_each_workload_and_reports_failures():
    records = [record("off", "P", [1.0]), record("on", "P", [0.5]),
               record("off", "S", [1.0], failed=2)]
    text = format_tables(records, ["off", "on"], ["P", "S", "unused"])
    assert "== P ==" in text and "== S ==" in text and "unused" not in text
    markdown = format_tables(records, ["off", "on"], ["P"], markdown=True)
    assert markdown.startswith("### P\n\n| metric |")


def test_paired_lines_compare_each_repeat_with_the_first_configurations_same_repeat():
    # The host drifts between repeats; "on" is 1.25x "off" in two of three pairs, so the
    # median of the pairs' ratios says 1.25 where the ratio of the medians says 1.0.
    off = [record("off", "S", [1.0, 1.0], duration_s=d, repeat=i)
           for i, d in enumerate((10.0, 5.0, 4.0, 4.0))]
    on = [record("on", "S", [0.5, 0.5], duration_s=d, repeat=i)
          for i, d in enumerate((8.0, 4.0, 5.0, 1.0))]
    on[3].status = "failed"  # its pair is left out
    records = off + on
    (line,) = paired_lines(records, ["off", "on"], "S")
    assert line.startswith("on / off, 3 repeats pair by pair: req/s 1.250, 1.250, 0.800 "
                           "(median 1.250); mean TTFT 0.500, 0.500, 0.500 (median 0.500)")
    assert "p99 TTFT" in line and "p99 ITL" in line
    assert "on / off, 3 repeats" in format_tables(records, ["off", "on"], ["S"])
    # One pair, another workload or a lone configuration: nothing to pair.
    assert paired_lines(off[:1] + on[:1], ["off", "on"], "S") == []
    assert paired_lines(records, ["off", "on"], "P") == []
    assert paired_lines(records, ["off"], "S") == []


def test_a_run_with_merged_stream_chunks_gets_a_note():
    """Its ITL rows measured a front end that fell behind: the table says so, for that run
    only."""
    from dataclasses import replace
    steady = record("one token a chunk", "S", [0.1, 0.2])
    merged = replace(record("merged", "S", [0.1, 0.2]),
                     result={**steady.result, "output_tokens_per_chunk": 1.9})
    lines = merged_stream_lines([steady, merged, None])
    assert len(lines) == 1 and lines[0].startswith("merged: 1.90 output tokens per chunk")
    assert "--api-server-count" in lines[0]
    assert "merged: 1.90" in format_tables([steady, merged], ["one token a chunk", "merged"],
                                           ["S"])
