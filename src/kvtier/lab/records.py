"""`RunRecord`: one configuration × workload outcome, and the results JSON / CSV written from it.

A record keeps what the report, plots and later comparisons need: vLLM's result fields (without
the per-request arrays, which would make results.json huge), the successful requests' TTFTs and
pooled ITLs in ms for the distribution plots, the kvtier server counters, the regime coordinates
(prefix working set and device KV pool, in tokens) and timings. A failed run is a record too,
with its error, so partial results survive and the report says what went wrong.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kvtier.bench.metrics import BenchmarkResult

OK, FAILED, SERVER_FAILED = "ok", "failed", "server-failed"
_CSV_METRICS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput",
                "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
                "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "output_tokens_per_chunk")
_KVTIER_COLUMNS = ("prompt_tokens", "matched_tokens", "computed_tokens", "num_preemptions",
                   "num_steps", "num_prompt_steps", "mean_prompt_step_ms",
                   "mean_decode_step_ms", "mean_server_ttft_ms", "mean_front_end_ms",
                   "mean_tokenize_ms", "mean_queue_time_ms", "mean_prefill_time_ms")


@dataclass
class RunRecord:
    """One configuration × workload run (or its failure)."""

    server: str
    workload: str
    status: str = OK
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    """vLLM's result JSON without per-request arrays, and the lab's
    `output_tokens_per_chunk` (`stream_tokens_per_chunk`)."""
    ttfts_ms: list[float] = field(default_factory=list)
    itls_ms: list[float] = field(default_factory=list)
    kvtier: dict[str, Any] | None = None
    """KvtierRunStats.to_json() when the server is kvtier."""
    prefix_working_set_tokens: int | None = None
    device_kv_tokens: int | None = None
    server_start_s: float = 0.0
    run_s: float = 0.0
    server_log: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    """Free-form coordinates, e.g. the sweep's {"knob": ..., "value": ...}."""
    repeat: int = 0
    """Which repetition of this configuration × workload (experiments with `repeats`)."""
    machine_steal_share: float | None = None
    """Share of the machine's CPU time that its hypervisor gave to other guests during the
    run (`kvtier.utils.host_counters`): on a shared virtual machine, a run that lost time so
    says so. None where the kernel does not report steal time."""
    server_cpu: dict[str, Any] | None = None
    """CPU seconds the server's processes used during the run, per process (`server` for the
    one the lab started, `child <pid>` for its engine process or other front ends) and its
    busiest threads (`ProcessTreeCPU.since`). None for a server the lab did not start, or
    off Linux."""

    @classmethod
    def from_result(cls, server: str, workload: str, result: BenchmarkResult,
                    **extra: Any) -> RunRecord:
        """Keep the summary fields and the successful requests' latencies (ms)."""
        per = result.per_request
        ok = [not e for e in per.get("errors", [])]
        ttfts = [t * 1000 for t, good in zip(per.get("ttfts", []), ok, strict=False) if good]
        itls = [g * 1000 for gaps, good in zip(per.get("itls", []), ok, strict=False) if good
                for g in gaps]
        failed_errors = sorted({e for e in per.get("errors", []) if e})
        summary = result.to_json(detailed=False)
        per_chunk = stream_tokens_per_chunk(summary.get("total_output_tokens", 0),
                                            summary.get("completed", 0), len(itls))
        if per_chunk is not None:
            summary["output_tokens_per_chunk"] = per_chunk
        return cls(server=server, workload=workload, result=summary,
                   ttfts_ms=ttfts, itls_ms=itls,
                   error="; ".join(failed_errors)[:1000], **extra)

    def metric(self, key: str) -> float | None:
        """A numeric result field (None when the run failed or the field is absent)."""
        value = self.result.get(key)
        return float(value) if isinstance(value, int | float) else None

    @property
    def succeeded(self) -> bool:
        return self.status == OK and bool(self.result.get("completed"))


def stream_tokens_per_chunk(output_tokens: int, completed: int, num_gaps: int) -> float | None:
    """Output tokens per streamed chunk after each stream's first: 1.0 when every token left
    the server in its own chunk (a token whose text ends mid-character waits for the next, so
    real text sits a little above). A front end that falls behind its engine sends a stream's
    queued tokens together, and the benchmark's ITL (vLLM's: the gap between two chunks)
    then grows with the chunks while the engine's steps do not. None without gaps."""
    if num_gaps <= 0:
        return None
    return (output_tokens - completed) / num_gaps


REPEATED_METRICS = ("request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms")
"""Per-run values kept (as `<metric>_runs`) when repeats are combined: the spread."""


def combine_repeats(records: list[RunRecord]) -> list[RunRecord]:
    """One record per configuration × workload: numeric result fields are the median of the
    successful repeats, latency samples are pooled, the kvtier counters are the median-
    throughput run's. A single run passes through unchanged."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for record in records:
        key = (record.server, record.workload, json.dumps(record.params, sort_keys=True))
        groups.setdefault(key, []).append(record)
    combined = []
    for group in groups.values():
        good = [r for r in group if r.succeeded]
        if len(group) == 1 or not good:
            combined.append(group[0])
            continue
        by_throughput = sorted(good, key=lambda r: r.metric("request_throughput") or 0.0)
        middle = by_throughput[(len(by_throughput) - 1) // 2]
        result = dict(middle.result)
        for key, value in middle.result.items():
            values = [r.metric(key) for r in good]
            if isinstance(value, int | float) and not isinstance(value, bool) and None not in \
                    values:
                result[key] = statistics.median(values)  # type: ignore[arg-type]
        for key in REPEATED_METRICS:
            result[f"{key}_runs"] = [r.metric(key) for r in good]
        combined.append(dataclasses.replace(
            middle, result=result, ttfts_ms=[t for r in good for t in r.ttfts_ms],
            itls_ms=[t for r in good for t in r.itls_ms], repeat=-1,
            run_s=sum(r.run_s for r in group),
            error="; ".join(sorted({r.error for r in group if r.error}))[:1000]))
    return combined


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: host, CPU count, Python (named in BENCHMARKS.md)."""
    import os

    return {"hostname": platform.node(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def write_results_json(path: Path, experiment: dict[str, Any], records: list[RunRecord]) -> None:
    """results.json: the experiment, the machine and every record (written atomically)."""
    data = {"experiment": experiment, "machine": machine_info(),
            "written": datetime.now().isoformat(timespec="seconds"),
            "runs": [asdict(r) for r in records]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, default=str, allow_nan=False),
                   encoding="utf-8")
    tmp.replace(path)


def path_problem(path: Path, exc: OSError) -> str:
    """Why `path` could not be created or written, in words (a file in a directory's place)."""
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{str(blocker)!r} is a file, not a directory"
    return exc.strerror or str(exc)


def read_results_json(path: Path) -> list[RunRecord]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [RunRecord(**run) for run in data["runs"]]


def finite(value: Any) -> Any:
    """Strict JSON: inf becomes "inf" (vLLM's spelling for request_rate), NaN becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def tier_names(records: list[RunRecord]) -> list[str]:
    """Every tier seen in any record, device first."""
    names: list[str] = []
    for record in records:
        for tier in (record.kvtier or {}).get("tier_hit_tokens", {}):
            if tier not in names:
                names.append(tier)
    return sorted(names, key=lambda t: (t != "device", t))


def csv_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One flat row per record: ids, status, vLLM metrics, kvtier counters, regime, timings."""
    tiers = tier_names(records)
    rows = []
    for r in records:
        row: dict[str, Any] = {"server": r.server, "workload": r.workload, "repeat": r.repeat,
                               "status": r.status}
        row.update({k: r.result.get(k, "") for k in _CSV_METRICS})
        stats = r.kvtier or {}
        row.update({f"server_{k}": stats.get(k, "") for k in _KVTIER_COLUMNS})
        hits = stats.get("tier_hit_tokens", {})
        row.update({f"hit_tokens_{t}": hits.get(t, "") for t in tiers})
        row.update(prefix_working_set_tokens=_blank(r.prefix_working_set_tokens),
                   device_kv_tokens=_blank(r.device_kv_tokens),
                   server_start_s=round(r.server_start_s, 2), run_s=round(r.run_s, 2),
                   machine_steal_share=_blank(r.machine_steal_share))
        cpu = (r.server_cpu or {}).get("cpu_s", {})
        row.update(server_cpu_s=_blank(cpu.get("server")),
                   server_children_cpu_s=_blank(
                       round(sum(v for k, v in cpu.items() if k != "server"), 2)
                       if cpu else None))
        row.update({f"param_{k}": v for k, v in r.params.items()})
        row["error"] = r.error
        rows.append(row)
    return rows


def write_results_csv(path: Path, records: list[RunRecord]) -> None:
    rows = csv_rows(records)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _blank(value: float | None) -> float | str:
    return "" if value is None else value
