"""The article's side-by-side table: one column per configuration, % change vs the first.

Rows are the article's (Requests/sec … P99 ITL), then the output tokens per streamed chunk,
which says whether the ITL rows measured the engine or a front end behind it. Latencies print
like the article: milliseconds below one second ("924.29 ms"), seconds above ("41.35 s").
Change is (value − first) / first, so for latencies a negative change is an improvement and
for throughputs a positive one.
A second table gives kvtier's own counters: where the matched prompt tokens came from.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence

from kvtier.lab.records import RunRecord, combine_repeats, tier_names

ARTICLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Requests/sec", "request_throughput", "rate"),
    ("Output tokens/sec", "output_throughput", "rate"),
    ("Total tokens/sec", "total_token_throughput", "rate"),
    ("Mean TTFT", "mean_ttft_ms", "ms"),
    ("Median TTFT", "median_ttft_ms", "ms"),
    ("P99 TTFT", "p99_ttft_ms", "ms"),
    ("Mean ITL", "mean_itl_ms", "ms"),
    ("Median ITL", "median_itl_ms", "ms"),
    ("P99 ITL", "p99_itl_ms", "ms"),
)
STREAM_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Output tokens per chunk", "output_tokens_per_chunk", "rate"),
)
"""Below the article's rows: above 1.0 the server merged tokens into chunks (its front end
fell behind), which inflates the ITL rows above it (`records.stream_tokens_per_chunk`)."""
MISSING = "—"
Grid = list[list[str]]
PAIRED_METRICS: tuple[tuple[str, str], ...] = (
    ("request_throughput", "req/s"), ("mean_ttft_ms", "mean TTFT"),
    ("p99_ttft_ms", "p99 TTFT"), ("p99_itl_ms", "p99 ITL"))
"""What `paired_lines` compares repeat by repeat."""


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return MISSING
    if unit == "ms":
        return f"{value / 1000:,.2f} s" if value >= 1000 else f"{value:,.2f} ms"
    if unit == "count":
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def percent_change(value: float | None, base: float | None) -> str:
    """"+12.3%" / "−4.5%" (a real minus sign, like the brief's tables); "—" without a base."""
    if value is None or base is None or base == 0:
        return MISSING
    change = (value - base) / base * 100
    sign = "+" if change >= 0 else "−"
    return f"{sign}{abs(change):.1f}%"


def comparison_grid(records: Sequence[RunRecord | None], names: Sequence[str]) -> Grid:
    """Header + article rows for one workload; records align with `names` (None = no run)."""
    changes = ["change"] if len(names) == 2 else [f"{n} vs {names[0]}" for n in names[1:]]
    header = ["metric", *names, *changes]
    grid = [header]
    base = records[0]
    for label, key, unit in ARTICLE_ROWS + STREAM_ROWS:
        values = [_metric(r, key) for r in records]
        changes = [percent_change(v, _metric(base, key)) for v in values[1:]]
        grid.append([label, *(format_value(v, unit) for v in values), *changes])
    return grid


def tier_grid(records: Sequence[RunRecord | None], names: Sequence[str]) -> Grid | None:
    """kvtier counters per configuration: prompt tokens sent, matched per tier, computed."""
    present = [r for r in records if r is not None and r.kvtier]
    if not present:
        return None
    tiers = tier_names(present)
    rows: list[tuple[str, str]] = [("Prompt tokens (server)", "prompt_tokens"),
                                          ("Matched, all caches", "matched_tokens")]
    rows += [(f"  hit tokens: {t}", t) for t in tiers]
    rows += [("Computed (prefilled)", "computed_tokens"), ("Preemptions", "num_preemptions"),
             ("Engine steps", "num_steps"), ("  with prompt tokens", "num_prompt_steps")]
    # A decoding stream waits through the steps with prompt tokens (decodes and prefills run
    # in separate steps on CUDA): their length shapes the ITL tail.
    step_rows = [("  mean step with prompt tokens", "mean_prompt_step_ms"),
                 ("  mean decode-only step", "mean_decode_step_ms")]
    # Where a client's TTFT goes: the server's own TTFT starts at the HTTP handler and ends
    # when the engine core applies the first token (vLLM's split of it below).
    latency_rows = [("Server mean TTFT", "mean_server_ttft_ms"),
                    ("  front end (parse, tokenise, to the core)", "mean_front_end_ms"),
                    ("    of which tokenise (arrival to token ids)", "mean_tokenize_ms"),
                    ("  queued in the engine core", "mean_queue_time_ms"),
                    ("  first scheduled to first token", "mean_prefill_time_ms")]
    grid = [["kvtier counters", *names]]
    for label, key in rows + step_rows + latency_rows:
        unit = "ms" if key.endswith("_ms") else "count"
        cells = []
        for r in records:
            stats = (r.kvtier or {}) if r is not None else {}
            value = (stats.get("tier_hit_tokens", {}).get(key) if key in tiers
                     else stats.get(key))
            cells.append(format_value(value, unit) if stats else MISSING)
        grid.append([label, *cells])
    return grid


def _metric(record: RunRecord | None, key: str) -> float | None:
    if record is None or not record.succeeded:
        return None
    return record.metric(key)


def render_text(grid: Grid) -> str:
    """Aligned columns: the label left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = []
    for n, row in enumerate(grid):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                        strict=True)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(grid: Grid) -> str:
    header, *body = grid
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def workload_records(records: Sequence[RunRecord], servers: Sequence[str],
                     workload: str) -> list[RunRecord | None]:
    """The record of each server for `workload` (None where it is missing); repeated runs
    are combined into their medians."""
    combined = combine_repeats([r for r in records if r.workload == workload])
    by_server = {r.server: r for r in combined}
    return [by_server.get(s) for s in servers]


def spread_lines(row: Sequence[RunRecord | None]) -> list[str]:
    """Per-run values behind medians of repeated runs: one line per configuration."""
    lines = []
    for record in row:
        runs = record.result.get("request_throughput_runs") if record else None
        if record is None or not runs:
            continue
        ttft = record.result.get("mean_ttft_ms_runs") or []
        itl = record.result.get("mean_itl_ms_runs") or []
        lines.append(f"{record.server}: median of {len(runs)} runs; req/s "
                     f"{', '.join(f'{v:.3f}' for v in runs)}; mean TTFT ms "
                     f"{', '.join(f'{v:.0f}' for v in ttft)}; mean ITL ms "
                     f"{', '.join(f'{v:.1f}' for v in itl)}")
    return lines


MERGED_CHUNKS_NOTE = 1.2
"""Output tokens per chunk above which a run's ITL rows get a note. Real text sits near 1.05:
a token whose text ends mid-character waits for the next."""


def merged_stream_lines(row: Sequence[RunRecord | None]) -> list[str]:
    """A line for each run whose server merged stream tokens into chunks: its ITL rows then
    measure how far the front end fell behind (`records.stream_tokens_per_chunk`)."""
    lines = []
    for record in row:
        per_chunk = _metric(record, "output_tokens_per_chunk")  # None without a record
        if per_chunk is not None and per_chunk > MERGED_CHUNKS_NOTE:
            assert record is not None
            lines.append(f"{record.server}: {per_chunk:.2f} output tokens per chunk: its front "
                         "end fell behind the engine and merged tokens, so its ITL rows "
                         "measure the front end (more front ends: --api-server-count)")
    return lines


def paired_lines(records: Sequence[RunRecord], servers: Sequence[str],
                 workload: str) -> list[str]:
    """Each configuration against the first, repeat by repeat (where both runs of a repeat
    succeeded, at least two such pairs): the ratio of each pair's values and their median.
    The lab interleaves repeats, so a host whose speed drifts over minutes moves both runs of
    a pair alike; the median of the pairs' ratios can then separate configurations that the
    ratio of their medians (the table) mixes with that drift."""
    if not servers:
        return []
    runs: dict[str, dict[tuple[int, str], RunRecord]] = {}
    for record in records:
        if record.workload == workload and record.succeeded and record.repeat >= 0:
            key = (record.repeat, json.dumps(record.params, sort_keys=True))
            runs.setdefault(record.server, {})[key] = record
    base = runs.get(servers[0], {})
    lines = []
    for server in servers[1:]:
        other = runs.get(server, {})
        pairs = sorted(base.keys() & other.keys())
        if len(pairs) < 2:
            continue
        parts = []
        for key, label in PAIRED_METRICS:
            ratios = [b / a for a, b in ((base[p].metric(key), other[p].metric(key))
                                         for p in pairs) if a and b is not None]
            if len(ratios) == len(pairs):
                parts.append(f"{label} {', '.join(f'{r:.3f}' for r in ratios)} "
                             f"(median {statistics.median(ratios):.3f})")
        if parts:
            lines.append(f"{server} / {servers[0]}, {len(pairs)} repeats pair by pair: "
                         + "; ".join(parts))
    return lines


def format_tables(records: Sequence[RunRecord], servers: Sequence[str],
                  workloads: Sequence[str], markdown: bool = False) -> str:
    """Every workload's article table (and kvtier counters), as text or Markdown."""
    render = render_markdown if markdown else render_text
    blocks = []
    for workload in workloads:
        row = workload_records(records, servers, workload)
        if all(r is None for r in row):
            continue
        title = f"### {workload}\n" if markdown else f"== {workload} =="
        blocks.append(title + "\n" + render(comparison_grid(row, servers)))
        tiers = tier_grid(row, servers)
        if tiers is not None:
            blocks.append(render(tiers))
        spread = (spread_lines(row) + paired_lines(records, servers, workload)
                  + merged_stream_lines(row))
        if spread:
            blocks.append("\n".join(f"- {line}" if markdown else line for line in spread))
        failures = [f"{r.server}: {r.status}: {r.error}" for r in row
                    if r is not None and not r.succeeded]
        if failures:
            blocks.append("\n".join(f"! {f}" for f in failures))
    return "\n\n".join(blocks)
