"""Serving metrics, exactly as `vllm bench serve` computes them (BRIEF §4). Pure: no I/O.

Per request (seconds on the client's monotonic clock, from the moment the request was sent):
TTFT = first choice-carrying chunk; ITL = gaps between successive choice-carrying chunks,
pooled per chunk over all requests; E2EL = last choice chunk; output tokens =
usage.completion_tokens, else the generated text re-tokenized without special tokens;
TPOT = (E2EL − TTFT) / (output tokens − 1), only for outputs longer than one token.
Aggregates cover successful requests; statistics are numpy's mean, median, population std and
linear-interpolated percentiles, reported in ms; an empty list reports 0 (vLLM's `x or 0`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
_HEADERS = {"ttft": ("TTFT", "Time to First Token"),
            "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
            "itl": ("ITL", "Inter-token Latency"),
            "e2el": ("E2EL", "End-to-end Latency")}
_PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "latencies",
                "generated_texts", "errors", "stream_errors")


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass
class RequestFuncOutput:
    """One request as the client saw it (vLLM's `RequestFuncOutput`); times in seconds."""

    success: bool = False
    prompt_len: int = 0
    """The dataset's count, replaced by the server's usage.prompt_tokens when sent."""
    output_tokens: int | None = None
    """usage.completion_tokens; None when the server sent no usage."""
    generated_text: str = ""
    start_time: float = 0.0
    """perf_counter() when the request was sent."""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    """E2EL: send to the last choice-carrying chunk."""
    error: str = ""
    stream_error: str = ""
    """An error event the server sent after some choices; the request still counts as
    successful, as vLLM's client counts it (not part of vLLM's record)."""
    request_id: str | None = None
    turn_index: int | None = None
    """0-based turn of a multi-turn conversation; None for single requests."""


def output_token_count(out: RequestFuncOutput, tokenizer: _Encoder | None) -> int:
    """usage.completion_tokens, else tokens of the text (no specials), else 1 without tokenizer."""
    if out.output_tokens:
        return out.output_tokens
    if tokenizer is None:
        return 1
    return len(tokenizer.encode(out.generated_text, add_special_tokens=False))


def request_tpot(out: RequestFuncOutput, output_len: int) -> float | None:
    """(E2EL − TTFT) / (n − 1) in seconds; None when n <= 1 (no decode gap to average)."""
    if output_len <= 1:
        return None
    return (out.latency - out.ttft) / (output_len - 1)


def stats_ms(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, Any]:
    """mean, median, std (population) and [(p, value)] percentiles of seconds, in ms."""
    data: Any = list(values_s) or 0
    return {"mean": float(np.mean(data)) * 1000, "median": float(np.median(data)) * 1000,
            "std": float(np.std(data)) * 1000,
            "percentiles": [(float(p), float(np.percentile(data, p)) * 1000) for p in percentiles]}


def parse_goodput(slos: Iterable[str] | str | Mapping[str, float] | None) -> dict[str, float]:
    """Parse `ttft:500 tpot:50 e2el:3000` (ms) into {metric: ms}; raises ValueError on bad input."""
    if not slos:
        return {}
    if isinstance(slos, Mapping):
        pairs = [(str(k), float(v)) for k, v in slos.items()]
    else:
        items = slos.split() if isinstance(slos, str) else list(slos)
        pairs = []
        for item in items:
            name, sep, value = item.partition(":")
            if not sep:
                raise ValueError(f"goodput SLO {item!r} is not KEY:VALUE (value in ms)")
            try:
                pairs.append((name.strip(), float(value)))
            except ValueError:
                raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of ms") \
                    from None
    for name, value in pairs:
        if name not in GOODPUT_METRICS:
            raise ValueError(f"goodput metric {name!r} is not one of {', '.join(GOODPUT_METRICS)}")
        if not value >= 0:  # NaN too: no request would meet it
            raise ValueError(f"goodput SLO {name}:{value} must be non-negative")
    return dict(pairs)


def count_good(per_request: Mapping[str, Sequence[float]], slos_ms: Mapping[str, float]) -> int:
    """Requests meeting every SLO (value <= SLO); `per_request` holds seconds per metric.

    TPOT values must include 0 for one-token outputs, which vLLM counts as meeting the SLO.
    """
    if not slos_ms:
        return 0
    columns = [per_request[name] for name in slos_ms]
    limits = [ms / 1000 for ms in slos_ms.values()]
    return sum(all(v <= lim for v, lim in zip(row, limits, strict=True))
               for row in zip(*columns, strict=True))


def peak_rates(successful: Sequence[RequestFuncOutput]) -> tuple[float, int]:
    """(max choice chunks in any 1-s bucket, peak concurrent requests), as vLLM reports them."""
    if not successful:
        return 0.0, 0
    t0 = min(o.start_time for o in successful)
    end = max(o.start_time + o.latency for o in successful)
    buckets = np.zeros(int(np.ceil(end - t0)) + 1)
    events: list[tuple[float, int]] = []
    for o in successful:
        times = o.start_time + o.ttft + np.concatenate(([0.0], np.cumsum(o.itl)))
        index = (times - t0).astype(int)
        np.add.at(buckets, index[(index >= 0) & (index < len(buckets))], 1)
        events += [(o.start_time, 1), (o.start_time + o.latency, -1)]
    events.sort()
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return float(buckets.max()), peak


@dataclass
class BenchmarkResult:
    """A run's figures; `to_json()` uses vLLM's result-JSON names (ms for latencies)."""

    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    duration: float
    """Seconds from the first dispatch to the last completion."""
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    latency_stats: dict[str, dict[str, Any]]
    """metric -> stats_ms(...) for ttft, tpot, itl, e2el."""
    max_output_tokens_per_s: float = 0.0
    max_concurrent_requests: int = 0
    num_prompts: int = 0
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    per_request: dict[str, list[Any]] = field(default_factory=dict)
    """vLLM's detailed arrays: input_lens, output_lens, ttfts, itls, generated_texts, errors, …"""
    mean_ttft_ms_by_turn: list[float] | None = None
    """Multi-turn only: mean TTFT of successful requests at each turn index."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """date, backend, label, model_id, tokenizer_id, dataset_name, …; emitted first."""
    server_metrics: dict[str, float] | None = None
    """Change of each Prometheus sample over the measured phase, when scraped."""
    warmup: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> float:
        """`mean_ttft_ms`, `median_itl_ms`, `std_e2el_ms`, `p99_tpot_ms`, … as attributes."""
        if name.endswith("_ms") and "latency_stats" in self.__dict__:
            flat = self._latency_fields()
            if name in flat:
                return flat[name]
        raise AttributeError(name)

    def _latency_fields(self) -> dict[str, float]:
        flat: dict[str, float] = {}
        for metric in METRICS:
            stats = self.latency_stats[metric]
            for key in ("mean", "median", "std"):
                flat[f"{key}_{metric}_ms"] = stats[key]
            for p, value in stats["percentiles"]:
                flat[f"p{_p_word(p)}_{metric}_ms"] = value
        return flat

    def to_json(self, detailed: bool = True) -> dict[str, Any]:
        """vLLM's result JSON; `detailed` keeps the per-request arrays (its --save-detailed)."""
        result: dict[str, Any] = dict(self.metadata)
        result.update(num_prompts=self.num_prompts,
                      request_rate="inf" if math.isinf(self.request_rate) else self.request_rate,
                      burstiness=self.burstiness, max_concurrency=self.max_concurrency,
                      duration=self.duration, completed=self.completed, failed=self.failed,
                      total_input_tokens=self.total_input_tokens,
                      total_output_tokens=self.total_output_tokens,
                      request_throughput=self.request_throughput,
                      request_goodput=self.request_goodput,
                      output_throughput=self.output_throughput,
                      total_token_throughput=self.total_token_throughput)
        if detailed:
            result.update(self.per_request)
        result.update(max_output_tokens_per_s=self.max_output_tokens_per_s,
                      max_concurrent_requests=self.max_concurrent_requests)
        result.update(self._latency_fields())
        for key in ("mean_ttft_ms_by_turn", "server_metrics", "warmup"):
            if getattr(self, key) is not None:
                result[key] = getattr(self, key)
        return result


def compute_result(
    outputs: Sequence[RequestFuncOutput], duration_s: float, tokenizer: _Encoder | None = None,
    percentiles: Sequence[float] = (99.0,), goodput: Mapping[str, float] | None = None,
) -> BenchmarkResult:
    """vLLM's `calculate_metrics` over measured outputs (failed ones count only as failed)."""
    output_lens = [output_token_count(o, tokenizer) if o.success else 0 for o in outputs]
    ok = [(o, n) for o, n in zip(outputs, output_lens, strict=True) if o.success]
    tpots = [request_tpot(o, n) for o, n in ok]
    values = {"ttft": [o.ttft for o, _ in ok],
              "tpot": [t for t in tpots if t is not None],
              "itl": [gap for o, _ in ok for gap in o.itl],
              "e2el": [o.latency for o, _ in ok]}
    good = count_good({"ttft": values["ttft"], "e2el": values["e2el"],
                       "tpot": [t or 0.0 for t in tpots]}, goodput or {})
    total_input = sum(o.prompt_len for o, _ in ok)
    total_output = sum(output_lens)
    peak_tokens, peak_requests = peak_rates([o for o, _ in ok])
    return BenchmarkResult(
        completed=len(ok), failed=len(outputs) - len(ok), total_input_tokens=total_input,
        total_output_tokens=total_output, duration=duration_s,
        request_throughput=len(ok) / duration_s,
        request_goodput=good / duration_s if goodput else None,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        latency_stats={m: stats_ms(values[m], percentiles) for m in METRICS},
        max_output_tokens_per_s=peak_tokens, max_concurrent_requests=peak_requests,
        num_prompts=len(outputs), per_request=_per_request(outputs, output_lens),
        mean_ttft_ms_by_turn=_ttft_by_turn([o for o, _ in ok]))


def _per_request(outputs: Sequence[RequestFuncOutput],
                 output_lens: list[int]) -> dict[str, list[Any]]:
    return dict(zip(_PER_REQUEST, (
        [o.prompt_len for o in outputs], output_lens, [o.ttft for o in outputs],
        [list(o.itl) for o in outputs], [o.start_time for o in outputs],
        [o.latency for o in outputs], [o.generated_text for o in outputs],
        [o.error for o in outputs], [o.stream_error for o in outputs]), strict=True))


def _ttft_by_turn(successful: Sequence[RequestFuncOutput]) -> list[float] | None:
    turns = [o.turn_index for o in successful if o.turn_index is not None]
    if not turns:
        return None
    by_turn: list[list[float]] = [[] for _ in range(max(turns) + 1)]
    for o in successful:
        if o.turn_index is not None:
            by_turn[o.turn_index].append(o.ttft)
    return [float(np.mean(v)) * 1000 if v else 0.0 for v in by_turn]


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def format_summary(result: BenchmarkResult,
                   percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl")) -> str:
    """vLLM's printed table ("==== Serving Benchmark Result ====" …) as one string."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<40} {value:<10{fmt}}")

    row("Successful requests:", result.completed)
    row("Failed requests:", result.failed)
    if result.max_concurrency is not None:
        row("Maximum request concurrency:", result.max_concurrency)
    if not math.isinf(result.request_rate):
        row("Request rate configured (RPS):", result.request_rate, ".2f")
    row("Benchmark duration (s):", result.duration, ".2f")
    row("Total input tokens:", result.total_input_tokens)
    row("Total generated tokens:", result.total_output_tokens)
    row("Request throughput (req/s):", result.request_throughput, ".2f")
    if result.request_goodput is not None:
        row("Request goodput (req/s):", result.request_goodput, ".2f")
    row("Output token throughput (tok/s):", result.output_throughput, ".2f")
    row("Peak output token throughput (tok/s):", result.max_output_tokens_per_s, ".2f")
    row("Peak concurrent requests:", float(result.max_concurrent_requests), ".2f")
    row("Total Token throughput (tok/s):", result.total_token_throughput, ".2f")
    for metric in METRICS:
        if metric not in percentile_metrics:
            continue
        short, header = _HEADERS[metric]
        stats = result.latency_stats[metric]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", stats["mean"], ".2f")
        row(f"Median {short} (ms):", stats["median"], ".2f")
        for p, value in stats["percentiles"]:
            row(f"P{_p_word(p)} {short} (ms):", value, ".2f")
    if result.mean_ttft_ms_by_turn:
        lines.append("{s:{c}^{n}}".format(s="Mean TTFT by turn", n=50, c="-"))
        for turn, value in enumerate(result.mean_ttft_ms_by_turn):
            row(f"Turn {turn + 1} (ms):", value, ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)
